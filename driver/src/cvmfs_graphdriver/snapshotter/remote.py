"""Remote snapshots: layers that already sit unpacked in CernVM-FS.

A committed snapshot can come from CVMFS in two ways:

- **Lazy pulls.** containerd's unpacker (for Docker >= 24, nerdctl and the CRI) prepares
  each layer with the labels `containerd.io/snapshot.ref` (the chain ID the snapshot is
  to be committed as) and `containerd.io/snapshot/cri.layer-digest` (the registry's
  compressed digest of the layer). When DUCC's `.layers/<d[0:2]>/<d>/layerfs` exists in
  an allowed repository, Prepare commits a remote snapshot under that chain ID and
  answers AlreadyExists: containerd then finds it with List and never fetches the blob.
- **Thin images.** A layer holding only `thin.json` (thin.descriptor_in) is committed
  as usual and then recorded as the remote stack of its descriptor's layers.

Either way the metadata holds {"type": "cvmfs", "layers": [{"repo", "path", "digest"},
...]} (base first), and "lazy": true for a lazy pull (is_lazy tells the two apart).
Mounting a child puts the layers' directories where the snapshot's own fs would be,
with the same whiteout masks between them as the graph driver's thin stacks
(thinstack.build_masks, built once per snapshot in its directory): literal `.wh.*` files
that `cvmfs_server ingest` keeps are hidden, and the deletions and opaque directories
they stand for take effect.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import re
import threading
from typing import Any, Collection, Dict, Iterator, List, Mapping, Optional, Tuple

from .. import metrics, thin, thinstack
from ..errors import DriverError
from .errdefs import AlreadyExists, FailedPrecondition, InvalidArgument
from .layout import SnapshotterLayout
from .metastore import KIND_ACTIVE, KIND_COMMITTED, Lower, read_only
from .overlay import OverlaySnapshotter

log = logging.getLogger(__name__)

TYPE = "cvmfs"
TARGET_REF_LABEL = "containerd.io/snapshot.ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CHAIN_RE = re.compile(r"sha256:[0-9a-f]{64}")
SHORT_LINK = 10  # characters of a link name in <home>/l (base32 of the target's sha256)
LOOKUP_SECONDS = 10  # how long a pull waits to learn whether a layer is published
LOOKUP_THREADS = 4


def layer_digest(labels: Mapping[str, str]) -> Optional[str]:
    """The hex of the layer digest a lazy Prepare names, or None when it names none.
    A digest of another form is refused (InvalidArgument), not ignored."""
    raw = labels.get(LAYER_DIGEST_LABEL)
    if raw is None:
        return None
    m = _DIGEST_RE.match(raw)
    if not m:
        raise InvalidArgument(
            f"label {LAYER_DIGEST_LABEL}={raw!r} is not a layer digest (sha256:<64 hex>)")
    return m.group(1)


class CvmfsLayers:
    """Finds published layers, records remote snapshots and mounts them."""

    def __init__(self, layout: SnapshotterLayout, cvmfs_root: str,
                 repositories: Collection[str], trust_unrecorded: bool = False) -> None:
        self.layout = layout
        self.cvmfs_root = cvmfs_root
        self.repositories = tuple(sorted(repositories))
        self.trust_unrecorded = trust_unrecorded
        self.markers = thinstack.MarkerCache(layout.marker_cache_dir, cvmfs_root)
        # A few threads for lookups in CVMFS; a lookup stuck in a hung mount holds one.
        self._lookups = concurrent.futures.ThreadPoolExecutor(
            max_workers=LOOKUP_THREADS, thread_name_prefix="cvmfs-lookup")
        self._locks: Dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # ------------------------------------------------------------------ finding

    def find(self, hexdigest: str) -> Optional[Tuple[thin.ThinLayer, str]]:
        """The published layer `hexdigest` in the first allowed repository that has it,
        and its directory; None when none has it, or when the repositories do not answer
        within LOOKUP_SECONDS (every pull asks: a stuck CVMFS mount must not stall the
        node's pulls - containerd then downloads the layer)."""
        future = self._lookups.submit(self._find, hexdigest)
        try:
            return future.result(timeout=LOOKUP_SECONDS)
        except concurrent.futures.TimeoutError:
            log.warning("CVMFS did not answer within %d s whether layer sha256:%s is "
                        "published (%s): containerd downloads it", LOOKUP_SECONDS,
                        hexdigest, ", ".join(self.repositories))
            return None

    def _find(self, hexdigest: str) -> Optional[Tuple[thin.ThinLayer, str]]:
        for repo in self.repositories:
            layer = thin.ThinLayer(repo, thin.layer_path(hexdigest), hexdigest)
            try:
                return layer, thin.resolve_layer_dir(self.cvmfs_root, layer)
            except DriverError:
                continue
        return None

    def is_the_layer(self, sn: OverlaySnapshotter, layer: thin.ThinLayer, real_dir: str,
                     ref: str, parent: str) -> bool:
        """Whether the published layer is the one containerd asks for: its recorded diff
        ID on the parent's chain must give the chain ID containerd will commit to.
        containerd checks a downloaded layer's diff ID itself; for a remote one this is
        the only check (without it an image could pair a published layer with another
        image's chain ID, and every image with that chain would get that layer)."""
        diff_id = thin.published_diff_id(self.cvmfs_root, layer, real_dir)
        if diff_id is None:
            if self.trust_unrecorded:
                return True
            log.warning("layer sha256:%s in %s has no recorded diff ID (published by another "
                        "tool?): containerd downloads it (trust_unrecorded_layers serves it "
                        "unchecked)", layer.digest, layer.repo)
            return False
        parent_chain = self._chain_of(sn, parent) if parent else None
        if parent and parent_chain is None:
            log.warning("parent %s has no chain ID: layer sha256:%s is downloaded", parent,
                        layer.digest)
            return False
        if thin.chain_id(parent_chain, diff_id) != ref:
            log.warning("layer sha256:%s in %s is %s, which on parent %s is not chain %s: not "
                        "the layer asked for, containerd downloads it", layer.digest,
                        layer.repo, diff_id, parent or "(none)", ref)
            return False
        return True

    @staticmethod
    def _chain_of(sn: OverlaySnapshotter, parent: str) -> Optional[str]:
        """A committed snapshot's chain ID: its snapshot.ref label (remote snapshots), or
        the chain ID containerd committed it under (`<namespace>/<n>/sha256:<hex>`)."""
        info = sn.stat(parent)
        ref = info.labels.get(TARGET_REF_LABEL, "")
        if _CHAIN_RE.fullmatch(ref):
            return ref
        m = _CHAIN_RE.search(info.name.rsplit("/", 1)[-1])
        return m.group(0) if m else None

    @staticmethod
    def record(layers: List[thin.ThinLayer], lazy: bool = False) -> Dict[str, Any]:
        """The remote record; `lazy`: a registry layer served from CVMFS (a lazy pull),
        not a thin image's layer (for the metrics' layer counts)."""
        out: Dict[str, Any] = {"type": TYPE, "layers": [
            {"repo": la.repo, "path": la.path, "digest": la.digest} for la in layers]}
        if lazy:
            out["lazy"] = True
        return out

    # ------------------------------------------------------------------ hooks

    def prepare_hook(self, sn: OverlaySnapshotter, key: str, parent: str,
                     labels: Mapping[str, str]) -> None:
        """A lazy pull: commit the layer as a remote snapshot under the chain ID
        containerd names and answer AlreadyExists, if the layer is published."""
        hexdigest = layer_digest(labels)
        ref = labels.get(TARGET_REF_LABEL)
        if hexdigest is None or not ref:
            return
        if not self.repositories:
            metrics.lazy_layers.inc(1, metrics.LAZY_DOWNLOADED)
            return
        found = self.find(hexdigest)
        if found is None:
            log.info("layer sha256:%s is not in %s: containerd downloads it", hexdigest,
                     ", ".join(self.repositories))
            metrics.lazy_layers.inc(1, metrics.LAZY_DOWNLOADED)
            return
        layer, real_dir = found
        if not self.is_the_layer(sn, layer, real_dir, ref, parent):
            metrics.lazy_layers.inc(1, metrics.LAZY_DOWNLOADED)
            return
        # One remote snapshot per chain and parent: containerd finds it by its labels and
        # parent, and another namespace may pull the same chain on another parent.
        name = ref if not parent else \
            f"{ref}@{hashlib.sha256(parent.encode()).hexdigest()[:16]}"
        try:
            sn.commit_remote(name, parent, self.record([layer], lazy=True), labels)
            log.info("layer sha256:%s: remote snapshot %s from %s", hexdigest, name, layer.url)
        except AlreadyExists:
            pass  # pulled before, the same layer on the same parent: the same answer
        metrics.lazy_layers.inc(1, metrics.LAZY_SERVED)
        raise AlreadyExists(f"target snapshot {ref!r}")

    def commit_hook(self, fs_dir: str) -> Optional[Dict[str, Any]]:
        """A thin image's layer (only thin.json) is committed as the remote stack of its
        descriptor's layers; a descriptor this node must not use refuses the commit."""
        layers = remote_of(fs_dir, self.repositories)
        return self.record(layers) if layers else None

    # ------------------------------------------------------------------ mounting

    def descriptor(self, remote: Mapping[str, Any]) -> thin.Descriptor:
        """The layers of a remote record, checked again: names, paths, the allow-list
        (a repository dropped from `repositories` is no longer mounted)."""
        layers = remote.get("layers")
        if not isinstance(layers, list) or not layers:
            raise FailedPrecondition(f"remote snapshot record without layers: {dict(remote)}")
        entries = [{"url": f"cvmfs://{e.get('repo')}/{e.get('path')}",
                    "digest": e.get("digest", "")} if isinstance(e, dict) else e
                   for e in layers]
        try:
            return thin.Descriptor("1.0", tuple(
                thin.parse_layer(e, i, frozenset(self.repositories))
                for i, e in enumerate(entries)))
        except thin.DescriptorError as e:
            metrics.descriptor_errors.inc()
            raise FailedPrecondition(str(e)) from None

    def lower_dirs(self, layout: SnapshotterLayout, lower: Lower,
                   has_parent: bool) -> List[str]:
        """The directories a remote snapshot stands for in a child's lowerdir, top first:
        its CVMFS layers (resolved inside their repositories) with the masks between."""
        assert lower.remote is not None
        try:
            desc = self.descriptor(lower.remote)
            try:
                real = [thin.resolve_layer_dir(self.cvmfs_root, la) for la in desc.layers]
            except DriverError as e:
                raise FailedPrecondition(str(e)) from None
            masks_dir = layout.masks(lower.id)
            with self._locked(lower.id):
                masks = thinstack.build_masks(desc, real, masks_dir,
                                              layout.masks_index(lower.id), self.markers)
        except BaseException:
            metrics.mount_errors.inc()  # the snapshot cannot be mounted
            raise
        return [self._short_link(layout, d)
                for _, d in thinstack.stack_dirs(real, masks, masks_dir, has_parent)]

    def _short_link(self, layout: SnapshotterLayout, target: str) -> str:
        """`<home>/l/<short>` -> target. containerd gives overlay its lowerdirs relative to
        their common directory when the options exceed one page; CVMFS paths share none
        with the home, so without these links a deep image could not be mounted (the
        graph driver's l/ links, for the same reason). The name is derived from the
        target, so the same directory always gets the same link."""
        short = base64.b32encode(hashlib.sha256(os.fsencode(target)).digest()).decode()
        for length in (SHORT_LINK, 26, 52):
            link = os.path.join(layout.links, short[:length])
            try:
                if os.readlink(link) == target:
                    return link
                continue  # another target under this name (a collision): a longer name
            except FileNotFoundError:
                pass
            os.makedirs(layout.links, mode=0o700, exist_ok=True)
            tmp = f"{link}.{threading.get_ident()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.rename(tmp, link)
            return link
        raise FailedPrecondition(f"no free short link for {target}")

    @contextlib.contextmanager
    def _locked(self, sid: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._locks.setdefault(sid, threading.Lock())
        with lock:
            yield


def remote_of(thin_dir: str, repositories: Collection[str]) -> Optional[List[thin.ThinLayer]]:
    """The CVMFS layers a committed snapshot's fs stands for, if it is a thin image's
    layer (only thin.json); None otherwise. InvalidArgument for a descriptor this node
    must not use (a repository not allowed, a path that escapes)."""
    try:
        desc = thin.descriptor_in(thin_dir, repositories)
    except thin.DescriptorError as e:
        metrics.descriptor_errors.inc()
        raise InvalidArgument(f"thin image layer cannot be used: {e}") from None
    return list(desc.layers) if desc is not None else None


def install(sn: OverlaySnapshotter, cvmfs_root: str, repositories: Collection[str],
            trust_unrecorded: bool = False) -> CvmfsLayers:
    """Make `sn` serve layers from CVMFS: lazy pulls, thin images, their mounts."""
    cv = CvmfsLayers(sn.layout, cvmfs_root, repositories, trust_unrecorded)
    sn.register_remote(TYPE, cv.lower_dirs)
    sn.add_prepare_hook(cv.prepare_hook)
    sn.add_commit_hook(cv.commit_hook)
    log.info("remote layers from %s under %s", ", ".join(cv.repositories) or "no repository",
             cvmfs_root)
    return cv


def is_lazy(record: object, fs_dir: str) -> bool:
    """Whether a remote snapshot is a lazy pull (a registry layer served from CVMFS, never
    downloaded) rather than a thin image's layer (its thin.json downloaded, committed and
    recorded): the one rule, for the metrics and for `status`. The record's "lazy" key
    says so (CvmfsLayers.record); a record without it (a thin layer's, or a lazy pull's
    from before the key) is lazy when the snapshot has no files of its own (`fs_dir`, its
    fs/): a lazy pull is committed without any, a thin layer's fs/ holds thin.json."""
    lazy = record.get("lazy") if isinstance(record, dict) else None
    if isinstance(lazy, bool):
        return lazy
    return not os.path.isdir(fs_dir)


def metric_samples(sn: OverlaySnapshotter, cv: CvmfsLayers) -> metrics.Samples:
    """The snapshotter's gauges (metrics.Exporter's collect, in the metrics thread; read
    in a read-only connection of its own, metastore.read_only):
    committed snapshots by kind (regular: unpacked here; thin; lazy), active snapshots,
    and how many of them stand on each repository's layers."""
    kinds = {"regular": 0.0, "thin": 0.0, "lazy": 0.0}
    active = 0.0
    per_repo: Dict[metrics.LabelValues, float] = {(r,): 0.0 for r in cv.repositories}
    # A connection of its own: the MetaStore's transaction() would hold the lock every
    # gRPC request waits on for the whole walk, every interval and every GET /metrics.
    with read_only(sn.ms.path) as tx:
        ids = {key: sid for sid, key in tx.id_map().items()}
        for info in tx.walk():
            if info.kind == KIND_COMMITTED:
                rec = tx.get_remote(info.name)
                if rec is None:
                    kinds["regular"] += 1
                elif is_lazy(rec, sn.layout.fs(ids[info.name])):
                    kinds["lazy"] += 1
                else:
                    kinds["thin"] += 1
            elif info.kind == KIND_ACTIVE:
                active += 1
                repos = set()
                for low in tx.get_snapshot(info.name).parents:
                    for la in (low.remote or {}).get("layers") or ():
                        if isinstance(la, dict) and isinstance(la.get("repo"), str):
                            repos.add(la["repo"])
                for repo in repos:
                    per_repo[(repo,)] = per_repo.get((repo,), 0.0) + 1
    return {
        metrics.LAYERS.name: {(k,): v for k, v in kinds.items()},
        metrics.MOUNTED_LAYERS.name: {(): active},
        metrics.REPOSITORY_MOUNTS.name: per_repo,
    }
