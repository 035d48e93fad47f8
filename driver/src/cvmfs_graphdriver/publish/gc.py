"""`cvmfs-thin gc`, `forget`, `images`: the image records of a store (records.py), read
and acted on through the store (stores.py), inside its session."""

from __future__ import annotations

import os
import re
import time
from typing import Dict, List, Optional

from .. import fdtree
from . import records
from .records import Plan, Record, RecordError
from .stores import PublishError, Store


def load_records(store: Store) -> Dict[str, Record]:
    """Every record of the store, by its path; one that cannot be read stops everything
    (it may be what keeps a layer in use)."""
    out: Dict[str, Record] = {}
    for name in store.listdir(records.RECORDS_DIR):
        if not records.is_record_name(name):
            continue  # a temporary file of a write in progress, or not ours
        rel = f"{records.RECORDS_DIR}/{name}"
        data = store.read(rel, records.MAX_RECORD_BYTES)
        if data is None:
            continue
        try:
            out[rel] = records.parse(data, store.view(rel))
        except RecordError as e:
            raise PublishError(f"image record {e}: nothing was changed; restore the file "
                               "(or remove it if its image is gone) and retry") from None
    return out


def read_record(store: Store, image: str) -> Optional[Record]:
    rel = records.record_path(image)
    data = store.read(rel, records.MAX_RECORD_BYTES)
    if data is None:
        return None
    try:
        return records.parse(data, store.view(rel))
    except RecordError as e:
        raise PublishError(f"image record {e}: restore or remove the file, then retry") from None


def unrecorded(store: Store, known: frozenset) -> int:
    """Layer and flat directories no record names: never collected (DUCC's, older ones)."""
    n = 0
    for parent in records.UNIT_PARENTS:
        for xx in store.listdir(parent):
            if len(xx) != 2 or xx.startswith("."):
                continue
            for name in store.listdir(f"{parent}/{xx}"):
                rel = f"{parent}/{xx}/{name}"
                if records.is_unit(rel) and rel not in known:
                    n += 1
    return n


def adoptable(store: Store, present: List[str]) -> List[str]:
    """Of the paths a publication found in the store already, those to adopt (no record
    names them: records.adoptable)."""
    return records.adoptable(present, load_records(store).values()) if present else []


def parse_age(text: str) -> int:
    """`--min-age`: seconds, or a number with s, m, h or d."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if m is None:
        raise ValueError(text)
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def plan(store: Store, recs: Dict[str, Record], min_age: int = 0,
         now: Optional[float] = None) -> Plan:
    """What gc would do. A unit released less than `min_age` seconds ago is kept (a
    container may still run on it): the record write that released it is dated no later
    than the newest `updated` of the records releasing it, so that time is used."""
    now = time.time() if now is None else now
    # Adopted units (found in the store unrecorded) may be used by unrecorded images.
    live = frozenset().union(*(r.live_units | r.adopted_units for r in recs.values()))
    released = frozenset().union(*(r.released_units for r in recs.values()))
    p = Plan()
    for unit in sorted(released):
        when = max(r.updated for r in recs.values() if unit in r.released_units)
        if unit in live:
            p.in_use += 1
        elif not os.path.isdir(store.view(unit)):
            p.already_gone.append(unit)
        elif now - when < min_age:
            p.recent[unit] = when
        else:
            p.delete[unit] = fdtree.directory_size(store.view(unit))
    # Once the units are gone, forgotten records have done their job and released
    # paths are settled (deleted, or now another record's to release); recent ones wait.
    settled = p.settled = released - frozenset(p.recent)
    for rel, r in sorted(recs.items()):
        if r.forgotten and not r.released_units & frozenset(p.recent):
            p.records_to_drop.append(rel)
        elif r.released:
            after = records.without_released(r, settled)
            if after != r:
                p.records_to_rewrite[rel] = after
    return p


# Deletes per commit: a cvmfs: store's commit is one `cvmfs_server ingest`, which joins its
# --delete paths into one argument (at most 128 KiB: E2BIG from ~1,700 layers).
BATCH = 200


def collect(store: Store, p: Plan, recs: Dict[str, Record], batch: int = BATCH) -> None:
    """Delete what the plan says, `batch` paths per commit (one transaction each in a
    cvmfs: store), each commit rewriting the records as they stand once its paths are
    gone: stopped between two, the store and its records agree (a record may release a
    unit already gone: the next gc settles it)."""
    doomed = [*p.delete, *p.records_to_drop]  # units first: a record goes after its units
    written = dict(recs)
    for start in range(0, max(len(doomed), 1), batch):
        chunk = doomed[start:start + batch]
        left = doomed[start + batch:]
        done = p.settled - frozenset(left)
        gone = frozenset(doomed[:start + batch])
        writes = {}
        for rel, r in sorted(written.items()):
            if rel in gone:
                continue
            after = p.records_to_rewrite.get(rel, r) if not left else \
                records.without_released(r, done)
            if after != r:
                writes[rel] = after
        store.commit({rel: r.to_json() for rel, r in writes.items()}, chunk)
        written.update(writes)
        for rel in chunk:
            written.pop(rel, None)
