"""Thin layers on disk: their descriptors, links into CVMFS, and cached whiteout masks.

(Paths: layout.Layout's thin_* names.) A lower entry `l/<short>` of a child that names a
thin layer is replaced, at mount time, by that layer's stack: mask-n, layer-n,
mask-(n-1), ..., layer-1 [, mask-0] (top first; thin.stack_order).

Two steps, kept apart:
- *plan*: what a stack is made of, from the home alone (`planned_dirs`, used by
  `docker inspect`): never touches CVMFS, builds nothing, writes nothing;
- *materialise* (`stack`, at mount time): resolve every layer inside its repository,
  find its markers (once, cached), build the masks (once), and make the short links.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from typing import Callable, ContextManager, Dict, List, Optional, Set, Tuple

from . import thin
from .config import Config
from .errors import DriverError
from .files import atomic_write, read
from .layout import Layout, layer_of_link_target, mask_name, new_short_id
from .whiteouts import LayerMarkers

log = logging.getLogger(__name__)

THIN_LINK_LENGTH = 10  # short names keep a 125-layer thin stack under one page of options
OVL_MAX_STACK = 500  # the kernel's limit on lower layers in one overlay mount


class ThinStacks:
    def __init__(self, layout: Layout, config: Config,
                 locked: Callable[[str], ContextManager[None]]) -> None:
        self.layout = layout
        self.config = config
        self._locked = locked
        self.markers = MarkerCache(layout.marker_cache_dir, config.cvmfs_root)

    # ------------------------------------------------------------------ ApplyDiff

    def record(self, layer_id: str) -> Optional[thin.Descriptor]:
        """If the applied layer is a thin image's layer, validate it and remember it.
        Raises DescriptorError (the pull fails) for a descriptor this node must not use."""
        desc = thin.descriptor_in(self.layout.diff(layer_id), self.config.repositories)
        if desc is None:
            return None
        os.makedirs(self.layout.thin_dir(layer_id), mode=0o700, exist_ok=True)
        atomic_write(self.layout.thin_descriptor(layer_id), desc.to_json())
        log.info("layer %s is thin: %d layers from %s", layer_id, len(desc.layers),
                 ", ".join(desc.repositories))
        return desc

    def descriptor(self, layer_id: str) -> Optional[thin.Descriptor]:
        try:
            with open(self.layout.thin_descriptor(layer_id), "rb") as f:
                return thin.parse_descriptor(f.read())
        except FileNotFoundError:
            return None

    def is_thin(self, layer_id: str) -> bool:
        return os.path.exists(self.layout.thin_descriptor(layer_id))

    # ------------------------------------------------------------------ plan

    def layer_of_entry(self, entry: str) -> Optional[str]:
        """The layer id an `l/<short>` lower entry points to (None for CVMFS/mask links)."""
        try:
            target = os.readlink(os.path.join(self.layout.home, entry))
        except OSError:
            return None
        return layer_of_link_target(target)

    def thin_layers(self, lower: str) -> List[str]:
        """The thin layers of a lower chain (from the home alone)."""
        out = []
        for entry in filter(None, lower.split(":")):
            tid = self.layer_of_entry(entry)
            if tid is not None and self.is_thin(tid):
                out.append(tid)
        return out

    def planned_dirs(self, tid: str) -> List[str]:
        """The directories thin layer `tid` stands for, top first, as planned: CVMFS
        layers as the descriptor names them (not resolved: CVMFS is not touched) and the
        masks already built. For reporting only."""
        desc = self.descriptor(tid)
        if desc is None:
            return []
        real = [os.path.join(self.config.cvmfs_root, la.repo, la.path) for la in desc.layers]
        built = built_masks(self.layout.thin_masks_index(tid)) or {}
        has_parent = bool(_read_or_empty(self.layout.parent_file(tid)))
        return [d for _, d in stack_dirs(real, built, self.layout.thin_masks(tid), has_parent)]

    def repositories_below(self, lower: str) -> Set[str]:
        """Repositories used by the thin layers in a lower chain (no CVMFS access)."""
        repos: Set[str] = set()
        for tid in self.thin_layers(lower):
            desc = self.descriptor(tid)
            if desc is not None:
                repos.update(desc.repositories)
        return repos

    # ------------------------------------------------------------------ materialise

    def expand(self, lower: str) -> str:
        """`lower` with each thin layer replaced by its CVMFS stack (checked, masks built)."""
        if not lower:
            return lower
        out: List[str] = []
        for entry in lower.split(":"):
            tid = self.layer_of_entry(entry)
            if tid is not None and self.is_thin(tid):
                out.extend(self.stack(tid))
            else:
                out.append(entry)
        if len(out) > OVL_MAX_STACK:
            raise DriverError(
                f"the layer stack has {len(out)} lower directories; overlayfs takes at most "
                f"{OVL_MAX_STACK} (publish the thin image with --flat)"
            )
        return ":".join(out)

    def stack(self, tid: str) -> List[str]:
        """Lower entries for thin layer `tid`, top first, everything in place."""
        desc = self.descriptor(tid)
        if desc is None:
            raise DriverError(f"layer {tid} is not a thin layer")
        for repo in desc.repositories:
            thin.check_allowed(repo, self.config.repositories, f"thin layer {tid}")
        real = [thin.resolve_layer_dir(self.config.cvmfs_root, la) for la in desc.layers]
        with self._locked(tid):
            masks = build_masks(desc, real, self.layout.thin_masks(tid),
                                self.layout.thin_masks_index(tid), self.markers)
            has_parent = bool(_read_or_empty(self.layout.parent_file(tid)))
            links = self._load_links(tid)
            known = dict(links)
            entries = [self._link(links, name, target) for name, target in
                       stack_dirs(real, masks, self.layout.thin_masks(tid), has_parent)]
            if links != known:  # only the first start (or a moved layer) writes
                atomic_write(self.layout.thin_links(tid), json.dumps(links))
        return entries

    def _load_links(self, tid: str) -> Dict[str, str]:
        try:
            with open(self.layout.thin_links(tid), encoding="utf-8") as f:
                links = json.load(f)
            return {str(k): str(v) for k, v in links.items()}
        except (FileNotFoundError, ValueError):
            return {}

    def _link(self, links: Dict[str, str], name: str, target: str) -> str:
        """A short link in l/ to `target`, created or corrected as needed."""
        if target.startswith(self.layout.home + os.sep):
            want = os.path.relpath(target, self.layout.links)
        else:
            want = target
        short = links.get(name)
        if short:
            path = self.layout.short_link(short)
            try:
                if os.readlink(path) == want:
                    return self.layout.lower_entry(short)
            except FileNotFoundError:
                pass
            except OSError:
                short = None  # not a link: pick a new name
        if not short:
            while True:
                short = new_short_id()[:THIN_LINK_LENGTH]
                if not os.path.lexists(self.layout.short_link(short)):
                    break
        tmp = self.layout.short_link(f".{short}.tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(want, tmp)
        os.rename(tmp, self.layout.short_link(short))
        links[name] = short
        return self.layout.lower_entry(short)

    def forget(self, tid: str) -> None:
        """Remove the l/ links of a thin layer (its directory is removed by the caller)."""
        for short in self._load_links(tid).values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.short_link(short))



# ---------------------------------------------------------------------------- shared
# What both faces (the graph driver's thin layers, the snapshotter's remote snapshots)
# use to stack CVMFS layers: their markers, found once, and the masks between them.


class MarkerCache:
    """The whiteout markers of CVMFS layers, found once per layer (the index cvmfs-thin
    publishes, or a metadata-only scan) and kept as small JSON files in `cache_dir`."""

    def __init__(self, cache_dir: str, cvmfs_root: str) -> None:
        self.cache_dir = cache_dir
        self.cvmfs_root = cvmfs_root

    def get(self, layer: thin.ThinLayer, real_dir: str) -> LayerMarkers:
        # v2: bookkeeping files are hidden too (older entries did not list them)
        path = os.path.join(self.cache_dir, hashlib.sha256(
            f"{layer.repo}/{layer.path}".encode()).hexdigest() + ".v2.json")
        try:
            with open(path, encoding="utf-8") as f:
                return LayerMarkers.from_json(f.read())
        except (FileNotFoundError, ValueError, KeyError):
            pass
        markers = self._published_index(layer, real_dir)
        if markers is not None:
            # The index lists the image's files; what the server added at the layer's root
            # (.cvmfscatalog from `ingest --catalog`) is found by a look at that directory.
            markers.markers += sorted(n for n in thin.CVMFS_BOOKKEEPING
                                      if os.path.lexists(os.path.join(real_dir, n)))
        else:
            markers = LayerMarkers.scan(real_dir, thin.CVMFS_BOOKKEEPING)
        os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        atomic_write(path, markers.to_json())
        log.info("CVMFS layer %s: %d whiteout markers", layer.url, len(markers.markers))
        return markers

    def _published_index(self, layer: thin.ThinLayer, real_dir: str) -> Optional[LayerMarkers]:
        """The markers cvmfs-thin recorded at publish time (.metadata/whiteouts.json)."""
        data = thin.read_layer_metadata(self.cvmfs_root, layer, real_dir, thin.WHITEOUT_INDEX)
        if data is None:
            return None
        try:
            markers = LayerMarkers.from_json(data.decode("utf-8"))
        except (ValueError, KeyError, TypeError):
            return None
        # The index comes from the repository: a name that is not a plain relative path
        # ('..', absolute, empty parts) would make build_mask work outside the mask.
        if not (all(_plain_path(p) for p in markers.markers + markers.deleted)
                and all(p == "" or _plain_path(p) for p in markers.opaque)):
            log.warning("ignoring the whiteout index of %s: it names paths outside the layer; "
                        "scanning instead", layer.url)
            return None
        return markers


def built_masks(index: str) -> Optional[Dict[int, Set[str]]]:
    """{k: set()} of the masks built (negative -k: {""} when layer k makes its root
    opaque), from their index file; None if they are not built yet."""
    try:
        with open(index, encoding="utf-8") as f:
            doc = json.load(f)
        return {int(k): set(v) for k, v in doc.items()}
    except (FileNotFoundError, ValueError):
        return None


def build_masks(desc: thin.Descriptor, real: List[str], masks_dir: str, index: str,
                markers: MarkerCache) -> Dict[int, Set[str]]:
    """Build (once) the masks of a stack of CVMFS layers into `masks_dir` (mask-K), then
    write `index` last (a crash just rebuilds them); return them as built_masks does.
    The caller holds the stack's lock."""
    built = built_masks(index)
    if built is not None:
        return built
    found = [markers.get(la, d) for la, d in zip(desc.layers, real)]
    plans = thin.plan_masks(found)
    shutil.rmtree(masks_dir, ignore_errors=True)
    building = masks_dir + ".building"
    shutil.rmtree(building, ignore_errors=True)
    os.makedirs(building, mode=0o700)
    result: Dict[int, Set[str]] = {}
    n = len(real)
    for k, plan in enumerate(plans):
        if plan.empty:
            continue
        sources = ([real[k]] if k < n else []) + ([real[k - 1]] if k >= 1 else [])
        thin.build_mask(os.path.join(building, mask_name(k)), plan, sources)
        result[k] = set()
    for k, m in enumerate(found, start=1):
        if "" in m.opaque:
            result[-k] = {""}
    os.rename(building, masks_dir)
    atomic_write(index, json.dumps({str(k): sorted(v) for k, v in result.items()}))
    return result


def stack_dirs(real: List[str], masks: Dict[int, Set[str]], masks_dir: str,
               has_parent: bool) -> List[Tuple[str, str]]:
    """(name, directory) of a materialised stack, top first ("mask-K" or "layer-K")."""
    order = thin.stack_order(real, {k for k in masks if k >= 0},
                             {-k for k, v in masks.items() if k < 0 and "" in v}, has_parent)
    return [(mask_name(k), os.path.join(masks_dir, mask_name(k))) if kind == "mask"
            else (f"layer-{k}", real[k - 1]) for kind, k in order]


def _plain_path(path: object) -> bool:
    """A relative path with no '', '.' or '..' components (as layer entries are)."""
    return (isinstance(path, str) and "\x00" not in path
            and all(part not in ("", ".", "..") for part in path.split("/")))


def _read_or_empty(path: str) -> str:
    try:
        return read(path)
    except FileNotFoundError:
        return ""
