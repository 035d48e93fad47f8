"""Thin images: descriptors that point at unpacked layers in CernVM-FS, and whiteout masks.

A thin layer's diff holds only `thin.json`. When such a layer is a parent, its CVMFS
layer directories go into the overlay lower stack instead of its own diff.

Layer trees published through `cvmfs_server ingest` (DUCC, `cvmfs-thin --store cvmfs:`)
hold whiteouts as ordinary `.wh.NAME` / `.wh..wh..opq` files, which overlayfs ignores.
So the driver puts a small local *mask* directory between consecutive CVMFS layers:

    mask[k] (between layer k and layer k+1, k = 0..n; layer n+1 is whatever comes above)
      - a 0:0 char device over every marker file of layer k   (hides the literal `.wh.*`)
      - a 0:0 char device for every name layer k+1 deletes     (`.wh.NAME` in layer k+1)
      - an opaque directory for every dir layer k+1 made opaque (`.wh..wh..opq`)

Directories a mask must contain to hold those entries copy the owner, mode and mtime of
the directory they stand over, so the container sees the same directory attributes.
Markers are found from metadata only (directory listings, no file contents) once per
CVMFS layer, and cached under the driver home.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
)

from . import whiteouts
from .errors import DriverError
from .files import NotReadable, read_regular
from .whiteouts import LayerMarkers

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DESCRIPTOR_NAME = "thin.json"
SUPPORTED_MAJOR = "1"
MAX_THIN_LAYERS = 125  # dockerd's own cap on image layers
MAX_DESCRIPTOR_BYTES = 1 << 20
CONFIG_HINT = "`repositories` in /etc/cvmfs-graphdriver/config.ini"

# Files CernVM-FS's server keeps in a published tree for itself (`cvmfs_server ingest
# --catalog` puts an empty .cvmfscatalog at the root of each layer): never part of an
# image, so containers must not see them.
CVMFS_BOOKKEEPING = frozenset({".cvmfscatalog", ".cvmfsautocatalog", ".cvmfsdirtab"})

# DUCC's repository layout: where a layer (keyed by its digest) and a flattened image sit.
LAYERS_DIR = ".layers"
LAYER_FS = "layerfs"  # the layer's files, beside its METADATA_DIR
FLAT_DIR = ".flat"


# Next to each published layer (`.layers/<xx>/<hex>/.metadata/`, as DUCC lays it out):
# whiteouts.json (its markers, for the masks) and origin.json (which image published it
# and, from cvmfs-thin, the layer's uncompressed "diff_id", which lazy pulls verify).
METADATA_DIR = ".metadata"
WHITEOUT_INDEX = "whiteouts.json"
ORIGIN_FILE = "origin.json"
MAX_METADATA_BYTES = 1 << 24


def layer_path(hexdigest: str) -> str:
    """`.layers/<hex[0:2]>/<hex>/layerfs`, relative to the repository root."""
    return f"{LAYERS_DIR}/{hexdigest[:2]}/{hexdigest}/{LAYER_FS}"


def flat_path(hexdigest: str) -> str:
    return f"{FLAT_DIR}/{hexdigest[:2]}/{hexdigest}"


# Matched whole (fullmatch): "$" alone would let a trailing newline through.
_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_DIGEST_RE = re.compile(r"(sha256:)?[0-9a-f]{64}")


class DescriptorError(DriverError):
    """A thin.json that cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class ThinLayer:
    repo: str
    path: str  # relative to the repository root, normalised, no '..'
    digest: str = ""

    @property
    def url(self) -> str:
        return f"cvmfs://{self.repo}/{self.path}"


@dataclass(frozen=True)
class Descriptor:
    version: str
    layers: Tuple[ThinLayer, ...]  # base first, as in the image manifest
    origin: str = ""

    @property
    def repositories(self) -> List[str]:
        return sorted({layer.repo for layer in self.layers})

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version,
            "origin": self.origin,
            "layers": [{"digest": la.digest, "url": la.url} for la in self.layers],
        }, indent=2) + "\n"


def _clean_path(raw: str, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise DescriptorError(f"{where}: empty layer path")
    if "\x00" in raw:
        raise DescriptorError(f"{where}: layer path contains a NUL byte")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DescriptorError(f"{where}: layer path {raw!r} climbs out of the repository with '..'")
    if not parts:
        raise DescriptorError(f"{where}: layer path {raw!r} names the repository root")
    return "/".join(parts)


def check_repository_name(repo: object) -> str:
    if not isinstance(repo, str) or not _REPO_RE.fullmatch(repo) or ".." in repo:
        raise DescriptorError(f"invalid repository name {repo!r}")
    return repo


def check_allowed(repo: str, allowed: Collection[str], where: str) -> None:
    """The node's repository allow-list (the `repositories` key): the one check, made
    when a thin layer is pulled and again each time one is mounted."""
    if repo not in allowed:
        listed = ", ".join(sorted(allowed)) or "none"
        raise DescriptorError(
            f"{where}: repository {repo} is not allowed on this node (allowed: {listed}); "
            f"add it to {CONFIG_HINT}"
        )


def _check_repo(repo: object, where: str, allowed: Optional[FrozenSet[str]]) -> str:
    try:
        check_repository_name(repo)
    except DescriptorError as e:
        raise DescriptorError(f"{where}: {e}") from None
    assert isinstance(repo, str)
    if allowed is not None:
        check_allowed(repo, allowed, where)
    return repo


def parse_layer(entry: object, index: int, allowed: Optional[FrozenSet[str]]) -> ThinLayer:
    where = f"thin.json layer {index}"
    if not isinstance(entry, dict):
        raise DescriptorError(f"{where}: expected an object, got {type(entry).__name__}")
    digest = entry.get("digest", "")
    if not isinstance(digest, str) or (digest and not _DIGEST_RE.fullmatch(digest)):
        raise DescriptorError(f"{where}: invalid digest {digest!r}")
    digest = digest.split(":")[-1]
    url = entry.get("url")
    if url is not None:
        if not isinstance(url, str) or not url.startswith("cvmfs://"):
            scheme = url.split("://")[0] if isinstance(url, str) and "://" in url else url
            raise DescriptorError(
                f"{where}: unsupported URL {url!r} (scheme {scheme!r}); "
                "thin layers must be cvmfs://REPOSITORY/PATH"
            )
        rest = url[len("cvmfs://"):]
        repo, _, path = rest.partition("/")
        repo = _check_repo(repo, where, allowed)
        return ThinLayer(repo, _clean_path(path, where), digest)
    # The first CVMFS graph driver: {"digest", "repo", "location"} meaning
    # <repo>/<location or "layers">/<digest>.
    if "repo" in entry:
        repo = _check_repo(entry["repo"], where, allowed)
        if not digest:
            raise DescriptorError(f"{where}: a layer given by repo/location needs its digest")
        location = entry.get("location") or "layers"
        if not isinstance(location, str):
            raise DescriptorError(f"{where}: location must be a string")
        return ThinLayer(repo, _clean_path(f"{location}/{digest}", where), digest)
    raise DescriptorError(f"{where}: needs a `url` (cvmfs://REPO/PATH) or `repo` and `digest`")


def parse_descriptor(data: bytes, allowed: Optional[Iterable[str]] = None,
                     max_layers: int = MAX_THIN_LAYERS) -> Descriptor:
    """Validate a thin.json; `allowed` None accepts any repository (publisher side)."""
    allow = frozenset(allowed) if allowed is not None else None
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError(f"thin.json is {len(data)} bytes; at most {MAX_DESCRIPTOR_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DescriptorError(f"thin.json is not valid JSON: {e}") from None
    except RecursionError:  # arrays or objects nested thousands deep (1 MiB holds plenty)
        raise DescriptorError("thin.json nests JSON too deeply to be a descriptor") from None
    if not isinstance(doc, dict):
        raise DescriptorError("thin.json must be a JSON object")
    version = doc.get("version")
    if not isinstance(version, str) or version.split(".")[0] != SUPPORTED_MAJOR:
        raise DescriptorError(
            f"thin.json version {version!r} is not supported (this driver reads 1.x); "
            "upgrade cvmfs-graphdriver or republish the image"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise DescriptorError("thin.json has no layers")
    if len(layers) > max_layers:
        raise DescriptorError(
            f"thin.json lists {len(layers)} layers; at most {max_layers} can be stacked "
            "(publish the image with --flat)"
        )
    origin = doc.get("origin", "")
    return Descriptor(
        version=version,
        layers=tuple(parse_layer(e, i, allow) for i, e in enumerate(layers)),
        origin=origin if isinstance(origin, str) else "",
    )


def descriptor_in(layer_dir: str, allowed: Iterable[str]) -> Optional[Descriptor]:
    """The validated descriptor of a thin image's layer, or None for any other layer.

    A thin layer holds `thin.json` and nothing else (so a regular image that happens to
    ship a /thin.json among its files stays a regular image). Raises DescriptorError for
    a descriptor this node must not use. Never opens anything but a regular file (a FIFO
    would block the pull, a device has effects: files.read_regular).
    """
    with os.scandir(layer_dir) as it:
        names = [e.name for e in itertools.islice(it, 2)]
    if names != [DESCRIPTOR_NAME]:
        return None
    path = os.path.join(layer_dir, DESCRIPTOR_NAME)
    try:
        if whiteouts.is_whiteout(os.lstat(path)):
            return None  # this layer deletes /thin.json: it is no descriptor
        data = read_regular(path, MAX_DESCRIPTOR_BYTES)
    except FileNotFoundError:
        return None
    except NotReadable as e:
        raise DescriptorError(f"thin.json {e}") from None
    return parse_descriptor(data, allowed)


def read_layer_metadata(cvmfs_root: str, layer: ThinLayer, real_dir: str,
                        name: str) -> Optional[bytes]:
    """A file of a published layer's `.metadata/` (None if there is none, or none that
    can be used), read only if it is a regular file inside the layer's repository, at
    most MAX_METADATA_BYTES (files.read_regular: a FIFO there must not hang the daemon,
    a symlink is not followed)."""
    if os.path.basename(real_dir) != LAYER_FS:
        return None
    path = os.path.join(os.path.dirname(real_dir), METADATA_DIR, name)
    real_repo = os.path.realpath(os.path.join(cvmfs_root, layer.repo))
    if not os.path.realpath(path).startswith(real_repo + os.sep):
        return None
    try:
        return read_regular(path, MAX_METADATA_BYTES)
    except FileNotFoundError:
        return None
    except NotReadable as e:
        log.warning("ignoring %s/%s of %s: it %s", METADATA_DIR, name, layer.url, e)
        return None


def published_diff_id(cvmfs_root: str, layer: ThinLayer, real_dir: str) -> Optional[str]:
    """The uncompressed digest the publisher recorded for a layer (origin.json)."""
    data = read_layer_metadata(cvmfs_root, layer, real_dir, ORIGIN_FILE)
    try:
        value = json.loads(data or b"null")
    except ValueError:
        return None
    diff_id = value.get("diff_id") if isinstance(value, dict) else None
    return diff_id if isinstance(diff_id, str) and _DIGEST_RE.fullmatch(diff_id) and \
        diff_id.startswith("sha256:") else None


def chain_id(parent_chain: Optional[str], diff_id: str) -> str:
    """The OCI chain ID of a layer: its diff ID at the bottom, else
    sha256(parent chain ID + " " + diff ID) - what containerd names snapshots by."""
    if not parent_chain:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode()).hexdigest()


def resolve_layer_dir(cvmfs_root: str, layer: ThinLayer) -> str:
    """The real directory of a layer, checked to lie inside its repository.

    Symlinks inside the repository are followed, but the result must stay below
    <cvmfs_root>/<repo>; a missing repository or layer gives an error that says which
    and how to check the client, and so does one that cannot be read (EACCES, ESTALE,
    EIO...). A repository that does not answer (a hung CVMFS or NFS mount) is given up
    after LOOKUP_SECONDS: the caller (a Get, a Prepare, a mount) gets an error then
    instead of blocking for good (bounded_lookup).
    """
    return bounded_lookup(lambda: _resolve_layer_dir(cvmfs_root, layer),
                          f"thin layer {layer.url}", layer.repo,
                          os.path.join(cvmfs_root, layer.repo))


def _resolve_layer_dir(cvmfs_root: str, layer: ThinLayer) -> str:
    repo_dir = os.path.join(cvmfs_root, layer.repo)
    try:
        if not stat.S_ISDIR(os.stat(repo_dir).st_mode):
            raise FileNotFoundError(repo_dir)
    except OSError as e:
        why = "is not available" if isinstance(e, (FileNotFoundError, NotADirectoryError)) \
            else f"cannot be read ({e.strerror})"
        raise DriverError(
            f"thin layer {layer.url}: CVMFS repository {layer.repo} {why} at {repo_dir}: "
            "check the CVMFS "
            f"client on this node (`cvmfs_config probe {layer.repo}`, "
            f"`ls {repo_dir}`) and that {layer.repo} is in CVMFS_REPOSITORIES"
        ) from None
    real_repo = os.path.realpath(repo_dir)
    wanted = os.path.join(repo_dir, layer.path)
    real = os.path.realpath(wanted)
    if real != real_repo and not real.startswith(real_repo + os.sep):
        raise DriverError(
            f"thin layer {layer.url} resolves to {real}, outside repository {layer.repo}; "
            "refusing to mount it"
        )
    try:
        is_dir = stat.S_ISDIR(os.stat(real).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as e:  # there, but not readable: say so, not "missing"
        raise DriverError(
            f"thin layer {layer.url} cannot be read: {wanted}: {e.strerror}. Check the "
            f"CVMFS client (`cvmfs_config probe {layer.repo}`, `ls {wanted}`)"
        ) from None
    if not is_dir:
        raise DriverError(
            f"thin layer {layer.url} is missing: {wanted} is not a directory. The image "
            f"refers to a layer that is not (or no longer) published in {layer.repo}; check "
            f"`ls {os.path.dirname(wanted)}` and the CVMFS client (`cvmfs_config probe "
            f"{layer.repo}`)"
        )
    return real


# Lookups in CVMFS that must not block their caller for good. A lookup runs in a daemon
# thread of its own (a thread blocked in a hung mount cannot be stopped; daemon threads
# do not hold up the daemon's exit, as a ThreadPoolExecutor's would); at most
# LOOKUP_THREADS wait at once, so a hung repository ties up that many threads, no more.
LOOKUP_SECONDS = 10.0
LOOKUP_THREADS = 4
_lookup_slots = threading.BoundedSemaphore(LOOKUP_THREADS)


def bounded_lookup(lookup: Callable[[], _T], what: str, repo: str, where: str) -> _T:
    """`lookup()`'s result or exception, or DriverError if it has not returned within
    LOOKUP_SECONDS (read when called)."""
    seconds = LOOKUP_SECONDS
    deadline = time.monotonic() + seconds
    late = DriverError(
        f"{what}: CVMFS repository {repo} did not answer within {seconds:g} s ({where}): "
        f"its mount hangs; check the CVMFS client on this node (`cvmfs_config probe "
        f"{repo}`, `cvmfs_config stat {repo}`)")
    if not _lookup_slots.acquire(timeout=seconds):
        raise late  # every lookup thread still waits on a repository
    done = threading.Event()
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = lookup()
        except BaseException as e:  # handed to the caller
            out["error"] = e
        finally:
            _lookup_slots.release()
            done.set()

    threading.Thread(target=run, name="cvmfs-lookup", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        log.warning("%s", late)
        raise late
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- masks


@dataclass
class MaskPlan:
    """What one mask directory holds."""

    whiteouts: Set[str]
    opaque: Set[str]

    @property
    def empty(self) -> bool:
        return not self.whiteouts and not self.opaque


def _below_any(path: str, roots: Set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:i]) in roots for i in range(1, len(parts)))


def pair_mask(below: Optional[LayerMarkers], above: Optional[LayerMarkers]) -> MaskPlan:
    """The mask that sits between two stacked CVMFS layers (either may be absent: the
    top of a stack, or a regular layer under its base). It hides the literal markers of
    the layer below and carries out the deletions and opaque directories of the layer
    above. It depends on those two layers only, so it can be built once per pair."""
    deleted: Set[str] = set(above.deleted) if above else set()
    opaque: Set[str] = {d for d in above.opaque if d} if above else set()
    # A deleted path the same layer also writes below (or makes opaque) was deleted
    # and recreated: it is an opaque directory.
    inner = _ancestors(deleted | opaque)  # directories that hold a marker of this layer
    recreated = {d for d in deleted if d in opaque or d in inner}
    deleted -= recreated
    opaque |= recreated
    # Markers of the layer below under a deleted or opaque path are hidden already.
    hidden_by = deleted | opaque
    markers = {m for m in (below.markers if below else ()) if not _below_any(m, hidden_by)}
    return MaskPlan(deleted | markers, opaque)


def plan_masks(layers: Sequence[LayerMarkers]) -> List[MaskPlan]:
    """mask[k] for k = 0..n, given the markers of layers 1..n (index 0 = layer 1)."""
    n = len(layers)
    return [pair_mask(layers[k - 1] if k >= 1 else None, layers[k] if k < n else None)
            for k in range(n + 1)]


def _ancestors(paths: Set[str]) -> Set[str]:
    """Every proper ancestor directory of `paths` (linear in their total depth: a layer
    with many deletions must not make mask planning quadratic)."""
    out: Set[str] = set()
    for path in paths:
        parts = path.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def build_mask(dest: str, plan: MaskPlan, attr_sources: Sequence[str]) -> None:
    """Create a mask directory at `dest` (must not exist) from `plan`.

    Directories take owner/mode/mtime from the first of `attr_sources` (the layer
    above, then the layer below) that has them.
    """
    os.mkdir(dest, 0o755)
    dirs: Dict[str, bool] = {}  # path -> opaque

    def need_dir(path: str, opaque: bool = False) -> None:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            dirs.setdefault(p, False)
        if opaque:
            dirs[path] = True

    for w in plan.whiteouts:
        if "/" in w:
            need_dir(w.rsplit("/", 1)[0])
    for d in plan.opaque:
        need_dir(d, opaque=True)
    for path in sorted(dirs, key=lambda p: p.count("/")):
        full = os.path.join(dest, path)
        os.mkdir(full, 0o755)
    for w in sorted(plan.whiteouts):
        whiteouts.make_whiteout(os.path.join(dest, w))
    for path in sorted(dirs, key=lambda p: -p.count("/")):
        full = os.path.join(dest, path)
        if dirs[path]:
            whiteouts.set_opaque(full)
        for src in attr_sources:
            candidate = os.path.join(src, path)
            # Only a directory really inside the layer (no symlinked parent) lends its
            # owner and mode.
            if os.path.realpath(candidate) != os.path.join(os.path.realpath(src), path):
                continue
            try:
                st = os.lstat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISDIR(st.st_mode):
                os.chown(full, st.st_uid, st.st_gid)
                os.chmod(full, stat.S_IMODE(st.st_mode))
                os.utime(full, ns=(st.st_atime_ns, st.st_mtime_ns))
                break
    st_root = None
    for src in attr_sources:
        try:
            st_root = os.lstat(src)
            break
        except FileNotFoundError:
            continue
    if st_root is not None:
        os.chown(dest, st_root.st_uid, st_root.st_gid)
        os.chmod(dest, stat.S_IMODE(st_root.st_mode))
        os.utime(dest, ns=(st_root.st_atime_ns, st_root.st_mtime_ns))


def stack_order(real: Sequence[str], masks: Collection[int], opaque_roots: Collection[int],
                has_parent: bool) -> List[Tuple[str, int]]:
    """The lower entries of a thin stack, top first: ("mask", k) and ("layer", k).

    `real` are the layer directories, base first; `masks` the k of the masks that are
    not empty; `opaque_roots` the k of layers whose root is opaque (nothing below them
    shows). mask-0 sits below the base layer: it only matters over a parent layer.
    An image can hold the same directory twice; overlayfs refuses to stack a directory
    twice (ELOOP), and the upper copy shadows everything the lower one shows, so the
    lower one is left out.
    """
    entries: List[Tuple[str, int]] = []
    for k in range(len(real), -1, -1):
        if k in masks and (k > 0 or has_parent):
            entries.append(("mask", k))
        if k >= 1:
            if real[k - 1] not in real[k:]:
                entries.append(("layer", k))
            if k in opaque_roots:
                break
    return entries
