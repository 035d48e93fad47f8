"""Image records: which published images use which layers of a store (for `gc`).

One small JSON file per published image, kept in the store itself:

    .cvmfs-thin/images/<sha256 of the image name>.json

    {"version": 1, "image": "registry.example.org/thin/python:3.12",
     "source": "python:3.12", "source_id": "sha256:...", "kind": "thin" | "flat",
     "paths": [".layers/ab/ab12.../layerfs", ...],   # what its thin.json points at
     "released": [...],   # paths an earlier version of the image used, no longer
     "forgotten": false,  # `cvmfs-thin forget`: the image is gone, its paths released
     "digests": "diff-id" | "registry",  # how its layers are keyed (convert --digests)
     "push": false,       # whether the thin image was pushed
     "adopted": [...],    # paths that were in the store, named by no record, when a
                          # publication of this image found them (DUCC's, an older
                          # cvmfs-thin's, `make`): images without a record may use them,
                          # so they are never released (carried over every republication)
     "updated": 1764720000, "tool": "cvmfs-thin 0.1.0"}

`gc` deletes a layer (or flattened image) only when a record released it (a newer
version of the image, or `forget`) and no live record uses it: a layer cvmfs-thin never
recorded (published by DUCC, by hand, or before records existed) is never a candidate,
nor is one a record adopted (found in the store, unrecorded, when the image was published).
Version 1 records (before `adopted`, `digests`, `push`) are read as adopting nothing, with
digests and push unknown (a wish list's rerun publishes such an image again, once).
Records are written while the store's publishing session is held, in one step each
(`Store.commit`: a rename in a dir: store, one `cvmfs_server ingest` transaction in a
cvmfs: store).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from .. import __version__, thin
from .stores import STORE_DIR

RECORDS_DIR = f"{STORE_DIR}/images"  # cvmfs-thin's own directory in a store: stores.py
VERSION = 2
READS = (1, 2)  # version 1: no "adopted" (none), "digests" or "push" (unknown)
DIGESTS = ("diff-id", "registry")
_V2_FIELDS = ("adopted", "digests", "push")
KINDS = ("thin", "flat")
MAX_RECORD_BYTES = 1 << 20

# The store's paths as thin.py spells them (layer_path, flat_path): the unit gc deletes
# and, for a layer, its layerfs below it.
_UNIT = r"({parent})/([0-9a-f]{{2}})/([0-9a-f]{{64}})"
_LAYER_UNIT_RE = re.compile(_UNIT.format(parent=re.escape(thin.LAYERS_DIR)))
_FLAT_RE = re.compile(_UNIT.format(parent=re.escape(thin.FLAT_DIR)))
_LAYERFS = "/" + thin.LAYER_FS
_NAME_RE = re.compile(r"[0-9a-f]{64}\.json")


class RecordError(Exception):
    """A record that cannot be read; the message names it."""


def record_path(image: str) -> str:
    """Where the record of `image` (a normalised thin image name) lives in the store."""
    return f"{RECORDS_DIR}/{hashlib.sha256(image.encode()).hexdigest()}.json"


def is_record_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))


def unit_of(path: str) -> str:
    """The directory `gc` deletes for a recorded path: `.layers/xx/<hex>` for a layer
    (its layerfs and .metadata together), `.flat/xx/<hex>` for a flattened image.
    Anything else is refused: records name store paths of these two forms only."""
    if path.endswith(_LAYERFS) and _is_unit(_LAYER_UNIT_RE, path[: -len(_LAYERFS)]):
        return path[: -len(_LAYERFS)]
    if _is_unit(_FLAT_RE, path):
        return path
    raise RecordError(f"{path!r} is not a layer or flattened-image path of a store")


def is_unit(rel: str) -> bool:
    """`.layers/xx/<hex>` or `.flat/xx/<hex>` (what unit_of returns)."""
    return _is_unit(_LAYER_UNIT_RE, rel) or _is_unit(_FLAT_RE, rel)


def _is_unit(pattern: re.Pattern, rel: str) -> bool:
    m = pattern.fullmatch(rel)
    return m is not None and m.group(3).startswith(m.group(2))


UNIT_PARENTS = (thin.LAYERS_DIR, thin.FLAT_DIR)


@dataclass(frozen=True)
class Record:
    image: str
    source: str
    source_id: str
    kind: str
    paths: Tuple[str, ...]
    released: Tuple[str, ...] = ()
    forgotten: bool = False
    updated: int = 0
    tool: str = ""
    adopted: Tuple[str, ...] = ()
    digests: str = ""  # "" : unknown (a version 1 record)
    push: Optional[bool] = None  # None: unknown (a version 1 record)

    @property
    def live_units(self) -> FrozenSet[str]:
        return frozenset() if self.forgotten else frozenset(unit_of(p) for p in self.paths)

    @property
    def adopted_units(self) -> FrozenSet[str]:
        """Never collected: images without a record may use them."""
        return frozenset(unit_of(p) for p in self.adopted)

    def publishes(self, source_id: str, kind: str, digests: str, push: bool) -> bool:
        """Whether this record stands for a publication of `source_id` as asked (a wish
        list's rerun skips it): same image and kind, same layer keys, pushed if asked."""
        return (not self.forgotten and self.source_id == source_id and self.kind == kind
                and (kind == "flat" or self.digests == digests)
                and (self.push is True or not push))

    @property
    def released_units(self) -> FrozenSet[str]:
        dead = set(self.released) | (set(self.paths) if self.forgotten else set())
        return frozenset(unit_of(p) for p in dead) - self.adopted_units

    def to_json(self) -> bytes:
        doc = {"version": VERSION, "image": self.image, "source": self.source,
               "source_id": self.source_id, "kind": self.kind, "paths": list(self.paths),
               "released": sorted(self.released), "forgotten": self.forgotten,
               "adopted": sorted(self.adopted), "digests": self.digests, "push": self.push,
               "updated": self.updated, "tool": self.tool}
        return (json.dumps(doc, indent=1) + "\n").encode()

    def same_publication(self, other: Record) -> bool:
        """Whether writing `other` over this record would change nothing but the time."""
        return (self.image, self.source, self.source_id, self.kind, self.paths, self.released,
                self.forgotten, self.adopted, self.digests, self.push) == (
                    other.image, other.source, other.source_id, other.kind, other.paths,
                    other.released, other.forgotten, other.adopted, other.digests, other.push)


def new_record(image: str, source: str, source_id: str, kind: str, paths: List[str],
               previous: Optional[Record], adopt: Iterable[str], digests: str,
               push: bool) -> Record:
    """The record of a publication of `image`; what an earlier one used and this one does
    not is released (for gc), as is whatever the earlier record had released already.
    `adopt`: paths of this publication that were in the store and no record named (see
    adoptable); they and the earlier record's adopted paths are never released."""
    if kind not in KINDS or digests not in DIGESTS:
        raise ValueError((kind, digests))
    adopt = list(adopt)
    for p in [*paths, *adopt]:
        unit_of(p)
    released: set = set()
    adopted = set(adopt)
    if previous is not None:
        adopted |= set(previous.adopted)
        released = set(previous.released) | set(previous.paths)
        released -= set(paths)
    released -= adopted
    return Record(image, source, source_id, kind, tuple(paths), tuple(sorted(released)),
                  False, int(time.time()), f"cvmfs-thin {__version__}", tuple(sorted(adopted)),
                  digests, push)


def adoptable(present: Iterable[str], recs: Iterable[Record]) -> List[str]:
    """Of the paths a publication found in the store already, those no record names
    (used, released or adopted): published by another tool or before records, maybe
    used by images without a record, so never to be released."""
    named = set().union(*(set(r.paths) | set(r.released) | set(r.adopted) for r in recs))
    return sorted(p for p in present if p not in named)


def forgotten(record: Record) -> Record:
    return Record(record.image, record.source, record.source_id, record.kind, record.paths,
                  record.released, True, int(time.time()), f"cvmfs-thin {__version__}",
                  record.adopted, record.digests, record.push)


def without_released(record: Record, gone: FrozenSet[str]) -> Record:
    """The record once gc deleted the units in `gone`."""
    keep = tuple(p for p in record.released if unit_of(p) not in gone)
    return Record(record.image, record.source, record.source_id, record.kind, record.paths,
                  keep, record.forgotten, record.updated, record.tool, record.adopted,
                  record.digests, record.push)


def parse(data: bytes, where: str) -> Record:
    """A record read from the store; anything malformed is refused, naming the file."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"{where}: larger than {MAX_RECORD_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise RecordError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RecordError(f"{where}: not a JSON object")
    version = doc.get("version")
    if type(version) is not int or version not in READS:
        raise RecordError(f"{where}: record version {version!r}, this cvmfs-thin reads "
                          f"versions {', '.join(map(str, READS))}: use the cvmfs-thin that "
                          "wrote it")
    for k in _V2_FIELDS:
        if (version >= 2) != (k in doc):
            raise RecordError(f"{where}: a version {version} record "
                              f"{'without' if version >= 2 else 'with'} {k!r}")
    digests, push = doc.get("digests", ""), doc.get("push")
    # "" and null: unknown, as in a version 1 record that was rewritten (forget, gc)
    if version >= 2 and (digests not in ("", *DIGESTS)
                         or not (push is None or isinstance(push, bool))):
        raise RecordError(f"{where}: 'digests' is not one of {DIGESTS} (or \"\": unknown) "
                          "or 'push' is not true, false or null (unknown)")
    strings = {k: doc.get(k) for k in ("image", "source", "source_id", "kind")}
    for k, v in strings.items():
        if not isinstance(v, str):
            raise RecordError(f"{where}: {k!r} is not a string")
    if strings["kind"] not in KINDS:
        raise RecordError(f"{where}: kind {strings['kind']!r} is not one of {KINDS}")
    lists: Dict[str, Tuple[str, ...]] = {}
    for k in ("paths", "released", "adopted"):
        v = doc.get(k, [])
        if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
            raise RecordError(f"{where}: {k!r} is not a list of paths")
        try:
            for p in v:
                unit_of(p)
        except RecordError as e:
            raise RecordError(f"{where}: {e}") from None
        lists[k] = tuple(v)
    if not isinstance(doc.get("forgotten", False), bool):
        raise RecordError(f"{where}: 'forgotten' is not true or false")
    updated = doc.get("updated", 0)
    return Record(str(strings["image"]), str(strings["source"]), str(strings["source_id"]),
                  str(strings["kind"]), lists["paths"], lists["released"],
                  bool(doc.get("forgotten", False)),
                  updated if isinstance(updated, int) else 0, str(doc.get("tool", "")),
                  lists["adopted"], str(digests), push if isinstance(push, bool) else None)


@dataclass
class Plan:
    """What gc would do: the units to delete (with their bytes), and what it keeps."""

    delete: Dict[str, int] = field(default_factory=dict)  # unit -> bytes
    in_use: int = 0  # released by one record, used by another: kept
    # released less than --min-age ago (a container may still run on it): kept, unit ->
    # the time of the newest write of a record that releases it (never before the release)
    recent: Dict[str, int] = field(default_factory=dict)
    # released units settled once `delete` is done (deleted, gone, or another's to release)
    settled: FrozenSet[str] = frozenset()
    already_gone: List[str] = field(default_factory=list)
    records_to_drop: List[str] = field(default_factory=list)  # forgotten, nothing left
    records_to_rewrite: Dict[str, Record] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.delete.values())
