"""`cvmfs-graphdriver status`: what a node's layer store holds, read from disk.

Reads, never writes: the graph driver's home (layout.Layout, the thin bookkeeping a thin
layer's ApplyDiff leaves), or the snapshotter's home (snapshotter.layout, its metadata
opened read-only), the kernel's mount table and the filesystem's free space. It needs
no daemon to be running, so it also tells what a stopped node holds.

    layers        regular (unpacked here), thin (a descriptor of CVMFS layers), lazy
                  (snapshotter: a layer published in CVMFS that was never downloaded),
                  incomplete (an ApplyDiff or a commit that has not finished)
    repositories  per CVMFS repository: the thin and lazy layers that stand on it
    mounts        the layer mounts now active (plugin: union views under the home;
                  snapshotter: active snapshots, which containerd mounts)
    disk          bytes the home takes (each inode once, mounts not crossed) and the
                  filesystem's size and free space
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import fdtree, mounts, thin
from .config import DEFAULT_CONFIG_PATH, Config, configured_mode, load, state_file
from .errors import DriverError
from .files import NotReadable, read_regular
from .layout import Layout, is_layer_name

MODES = ("plugin", "snapshotter")


class StatusError(DriverError):
    """The store cannot be read; the message says why and what to do."""


@dataclass
class Disk:
    used_bytes: int = 0
    filesystem: str = ""
    total_bytes: int = 0
    free_bytes: int = 0
    free_inodes: int = 0
    total_inodes: int = 0


@dataclass
class ThinLayerRef:
    """A CVMFS layer a layer of this node stands on (a thin layer's or a lazy pull's)."""

    layer: str  # the node's layer id or snapshot key
    repo: str
    path: str  # relative to the repository root


@dataclass
class StoreStatus:
    mode: str
    home: str
    regular: int = 0
    thin: int = 0
    lazy: int = 0
    incomplete: int = 0
    # repository -> {"thin": n, "lazy": n}: node layers standing on it
    repositories: Dict[str, Dict[str, int]] = field(default_factory=dict)
    active_mounts: List[str] = field(default_factory=list)
    disk: Disk = field(default_factory=Disk)
    refs: List[ThinLayerRef] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.regular + self.thin + self.lazy

    def count_repo(self, repo: str, kind: str) -> None:
        per = self.repositories.setdefault(repo, {"thin": 0, "lazy": 0})
        per[kind] += 1

    def to_json(self) -> Dict[str, Any]:
        return {
            "mode": self.mode,
            "home": self.home,
            "layers": {"total": self.total, "regular": self.regular, "thin": self.thin,
                       "lazy": self.lazy, "incomplete": self.incomplete},
            "repositories": {r: dict(v) for r, v in sorted(self.repositories.items())},
            "mounts": {"active": len(self.active_mounts),
                       "mount_points": list(self.active_mounts)},
            "disk": asdict(self.disk),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------- disk


def disk_usage(home: str) -> Disk:
    """The bytes the home's files take (allocated blocks, each inode once, not crossing
    into other filesystems: layer mounts and CVMFS), and its filesystem's figures."""
    top = os.lstat(home)
    seen = {(top.st_dev, top.st_ino)}
    used = top.st_blocks * 512

    def same_fs(st: os.stat_result) -> bool:
        return st.st_dev == top.st_dev

    # fdtree's walk: iterative (os.walk recurses, and a container's `mkdir -p` can nest
    # deeper than Python's recursion limit), never through a symlink.
    fd = os.open(home, fdtree.DIR_FLAGS)
    try:
        for _, _, st in fdtree.walk(fd, descend=same_fs):
            # a mount (a layer's merged view, CVMFS): its files are counted where they lie
            if same_fs(st) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used += st.st_blocks * 512
    finally:
        os.close(fd)
    vfs = os.statvfs(home)
    try:
        fs = mounts.fs_name(home)
    except OSError:
        fs = "unknown"
    return Disk(used_bytes=used, filesystem=fs,
                total_bytes=vfs.f_blocks * vfs.f_frsize, free_bytes=vfs.f_bavail * vfs.f_frsize,
                free_inodes=vfs.f_favail, total_inodes=vfs.f_files)


# ---------------------------------------------------------------------------- plugin


def plugin_status(home: str, entries: Optional[List[mounts.MountEntry]] = None,
                  disk: bool = True) -> StoreStatus:
    """The graph driver's home `home` (Init's home: the driver records it, see
    config.state_file). disk=False leaves out the walk that measures it (`check`)."""
    layout = Layout(os.path.realpath(home))
    out = StoreStatus("plugin", layout.home)
    try:
        names = sorted(os.listdir(layout.home))
    except OSError as e:
        raise StatusError(f"cannot read the driver home {layout.home}: {e.strerror}") from None
    for name in names:
        if not is_layer_name(name) or not os.path.isdir(layout.dir(name)):
            continue
        if os.path.exists(layout.applying_marker(name)):
            out.incomplete += 1
            continue
        try:
            data = read_regular(layout.thin_descriptor(name), thin.MAX_DESCRIPTOR_BYTES)
        except FileNotFoundError:
            out.regular += 1
            continue
        except NotReadable as e:
            out.notes.append(f"layer {name}: thin descriptor {e}")
            out.thin += 1
            continue
        out.thin += 1
        try:
            desc = thin.parse_descriptor(data)
        except thin.DescriptorError as e:
            out.notes.append(f"layer {name}: {e}")
            continue
        for repo in desc.repositories:
            out.count_repo(repo, "thin")
        out.refs.extend(ThinLayerRef(name, la.repo, la.path) for la in desc.layers)
    out.active_mounts = sorted(
        m for m in mounts.mounts_under(layout.home, entries)
        if m == layout.merged(os.path.basename(os.path.dirname(m))))
    if disk:
        out.disk = disk_usage(layout.home)
    return out


# ---------------------------------------------------------------------------- snapshotter


def snapshotter_status(home: str, disk: bool = True) -> StoreStatus:
    """The snapshotter's home, its metadata read in a read-only connection (the daemon
    may be using it: SQLite's WAL lets a reader see the last commit). disk=False leaves
    out the walk that measures it (`check`)."""
    import sqlite3  # here: the graph-driver face never needs it

    from .snapshotter.layout import SnapshotterLayout
    from .snapshotter.metastore import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, read_only
    from .snapshotter.remote import is_lazy

    layout = SnapshotterLayout(os.path.realpath(home))
    out = StoreStatus("snapshotter", layout.home)
    if not os.path.isdir(layout.home):
        raise StatusError(f"the snapshotter home {layout.home} does not exist: the "
                          "snapshotter makes it when it first starts (systemctl start "
                          "cvmfs-graphdriver-snapshotter.socket, then pull an image)")
    if os.path.exists(layout.metadata_db):
        try:
            with read_only(layout.metadata_db) as tx:
                infos = tx.walk()
                remotes = {i.name: tx.get_remote(i.name) for i in infos
                           if i.kind == KIND_COMMITTED}
                ids = {key: sid for sid, key in tx.id_map().items()}
        except sqlite3.Error as e:
            raise StatusError(f"cannot read {layout.metadata_db}: {e}") from None
        for info in infos:
            if info.kind in (KIND_ACTIVE, KIND_VIEW):
                out.active_mounts.append(info.name)
                continue
            record = remotes.get(info.name)
            if not record:
                out.regular += 1
                continue
            kind = "lazy" if is_lazy(record, layout.fs(ids[info.name])) else "thin"
            setattr(out, kind, getattr(out, kind) + 1)
            repos = set()
            for layer in _record_layers(info.name, record, out.notes):
                repos.add(layer.repo)
                out.refs.append(ThinLayerRef(info.name, layer.repo, layer.path))
            for repo in sorted(repos):
                out.count_repo(repo, kind)
    else:
        out.notes.append("no snapshot metadata yet (nothing was pulled)")
    with suppress(FileNotFoundError):
        out.incomplete = len(os.listdir(layout.staging))
    if disk:
        out.disk = disk_usage(layout.home)
    return out


def _record_layers(name: str, record: Any, notes: List[str]) -> List[thin.ThinLayer]:
    """The CVMFS layers of a remote snapshot's record ({"type", "layers": [{"repo",
    "path", "digest"}]}), each checked as a descriptor's layer is (repository name, a
    path that stays inside the repository)."""
    layers = record.get("layers") if isinstance(record, dict) else None
    out = []
    for i, la in enumerate(layers if isinstance(layers, list) else []):
        try:
            if not isinstance(la, dict):
                raise thin.DescriptorError(f"layer {i} is not an object")
            out.append(thin.parse_layer(
                {"url": f"cvmfs://{la.get('repo')}/{la.get('path')}"}, i, None))
        except thin.DescriptorError as e:
            notes.append(f"snapshot {name}: {e}")
    return out


# ---------------------------------------------------------------------------- output


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render(st: StoreStatus) -> str:
    """The readable table."""
    rows = [
        ("mode", st.mode),
        ("home", st.home),
        ("layers", str(st.total)),
        ("  regular", str(st.regular)),
        ("  thin", str(st.thin)),
        ("  lazily pulled", str(st.lazy) if st.mode == "snapshotter" else "- (snapshotter only)"),
        ("  incomplete", str(st.incomplete)),
        ("active mounts" if st.mode == "plugin" else "active snapshots",
         str(len(st.active_mounts))),
        ("disk used", human_bytes(st.disk.used_bytes)),
        ("filesystem", f"{st.disk.filesystem}, {human_bytes(st.disk.free_bytes)} free of "
         f"{human_bytes(st.disk.total_bytes)}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if st.repositories:
        lines += ["", f"{'repository':<30} {'thin':>6} {'lazy':>6}"]
        for repo, per in sorted(st.repositories.items()):
            lines.append(f"{repo:<30} {per['thin']:>6} {per['lazy']:>6}")
    lines += [f"note: {n}" for n in st.notes]
    return "\n".join(lines)


def dumps(st: StoreStatus) -> str:
    return json.dumps(st.to_json(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------- home


def find_home(cfg: Config, mode: str, state_file_of: Callable[[str], str] = state_file,
              ) -> Tuple[Optional[str], str, str]:
    """(home, detail, fix): the plugin's is the one dockerd's Init gave, which the
    daemon records (config.state_file, or `state_file_of`); the snapshotter's is
    configured."""
    if mode == "snapshotter":
        home = cfg.snapshotter_home
        if os.path.isdir(home):
            return home, f"{home} (snapshotter)", ""
        return None, f"the snapshotter home {home} does not exist", (
            "start the snapshotter (systemctl start cvmfs-graphdriver-snapshotter.socket "
            "containerd docker); it makes its home when it first starts")
    path = state_file_of(cfg.socket)
    try:
        with open(path, encoding="utf-8") as f:
            home = json.load(f)["Home"]
    except FileNotFoundError:
        return None, (f"the driver has no home yet: {path} is missing, so dockerd has "
                      "not initialised the driver since the node booted"), (
            "systemctl start docker (dockerd calls the driver's Init when it starts)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"cannot read the driver's state {path}: {e}", (
            f"systemctl restart docker (dockerd's Init rewrites {path})")
    if not isinstance(home, str) or not os.path.isdir(home):
        return None, f"the home {home!r} recorded in {path} does not exist", (
            "systemctl restart docker (dockerd's Init makes the home again)")
    return home, f"{home} (Init's, recorded in {path})", ""


# ---------------------------------------------------------------------------- command


def node_arguments(p: argparse.ArgumentParser, json_help: str, mode_help: str) -> None:
    """--config, --json and --mode, which `status` and `check` both take."""
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--mode", choices=("auto",) + MODES, default="auto",
                   help=f"{mode_help} (default: snapshotter when the configuration has a "
                   "[snapshotter] section, else plugin)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    node_arguments(p, "print JSON", "which store to read")
    p.add_argument("--home", metavar="DIR",
                   help="the store's home (default: the plugin's Init home, which the "
                   "daemon records, or [snapshotter] home)")


def command(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    mode = configured_mode(args.config) if args.mode == "auto" else args.mode
    home = args.home
    if home is None:
        home, detail, fix = find_home(cfg, mode)
        if home is None:
            raise StatusError(f"{detail}; {fix}")
    st = snapshotter_status(home) if mode == "snapshotter" else plugin_status(home)
    print(dumps(st) if args.json else render(st))
    return 0
