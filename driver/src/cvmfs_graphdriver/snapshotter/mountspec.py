"""The mounts a snapshot is used through, exactly as containerd 1.6's overlayfs snapshotter
returns them (snapshots/overlay/overlay.go, `mounts`); containerd (or the client) mounts
them, the snapshotter never does.

- no parent:                 bind `<fs>`, options [rw|ro, rbind] (rw for an active
                             snapshot, ro for a view)
- a view on one lower dir:   bind `<lower>`, options [ro, rbind]
- otherwise:                 overlay, options [index=off]? [userxattr]?
                             [workdir=<work>, upperdir=<fs>]  (active only)
                             lowerdir=<lower1>:<lower2>:…      (immediate parent first)

`index=off` is passed when the kernel knows the option (containerd's supportsIndex);
`userxattr` when running in a user namespace where the kernel needs it
(containerd's overlayutils.NeedsUserXAttr).

A parent chain expands to lower directories one committed snapshot at a time: a local
snapshot is its `fs/`; a remote one (a CVMFS layer and its whiteout masks) is whatever
its resolver returns, top first. With only local snapshots this is containerd's rule of
"one parent → bind"; a remote parent that expands to several directories is mounted as
an overlay even in a view.

Pure functions, plus the two probes (`supports_index`, `needs_userxattr`).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import List, Sequence, Tuple

log = logging.getLogger(__name__)

TMPFS_MAGIC = 0x01021994


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount (the target is chosen by whoever mounts it)."""

    type: str
    source: str
    options: Tuple[str, ...]


@dataclass(frozen=True)
class MountOptions:
    index_off: bool = False
    userxattr: bool = False


def snapshot_mounts(active: bool, upper: str, work: str, lowers: Sequence[str],
                    opts: MountOptions) -> List[Mount]:
    """The mounts of an active (`active`) or view snapshot.

    upper, work: the snapshot's own fs/ and work/; lowers: the parent chain's lower
    directories, immediate parent's first (empty: no parent)."""
    if not lowers:
        return [Mount("bind", upper, ("rw" if active else "ro", "rbind"))]
    options: List[str] = []
    if opts.index_off:
        options.append("index=off")
    if opts.userxattr:
        options.append("userxattr")
    if active:
        options += [f"workdir={work}", f"upperdir={upper}"]
    elif len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]


# ---------------------------------------------------------------------------- probes


def supports_index() -> bool:
    """containerd's supportsIndex: the kernel has overlay's `index` parameter."""
    return os.path.exists("/sys/module/overlay/parameters/index")


def running_in_userns(uid_map: str = "/proc/self/uid_map") -> bool:
    """containerd's userns.RunningInUserNS: uid_map is not the identity of all 2^32 ids."""
    try:
        with open(uid_map, encoding="ascii") as f:
            line = f.readline()
    except OSError:
        return False
    fields = line.split()
    return not (len(fields) == 3 and fields == ["0", "0", "4294967295"])


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if m is None:
        return False
    return (int(m.group(1)), int(m.group(2))) >= (major, minor)


def needs_userxattr(home: str) -> bool:
    """containerd's overlayutils.NeedsUserXAttr: overlay must be mounted with `userxattr`.

    Never for the real root; not on tmpfs; yes on kernels >= 5.11 in a user namespace;
    else probed by mounting an overlay with the option."""
    if not running_in_userns():
        return False
    from .. import mounts  # the graph driver's mount helpers (statfs, mount, unmount)

    try:
        if mounts.fs_magic(home) == TMPFS_MAGIC:
            return False
    except OSError:
        pass
    if _kernel_at_least(5, 11):
        return True
    with tempfile.TemporaryDirectory(prefix="userxattr-check-", dir=home) as td:
        for d in ("lower1", "lower2", "upper", "work", "merged"):
            os.mkdir(os.path.join(td, d), 0o755)
        data = (f"lowerdir={td}/lower2:{td}/lower1,upperdir={td}/upper,"
                f"workdir={td}/work,userxattr")
        try:
            mounts.mount_overlay(data, os.path.join(td, "merged"))
        except OSError as e:
            log.debug("cannot mount overlay with userxattr (kernel without it?): %s", e)
            return False
        mounts.unmount(os.path.join(td, "merged"))
        return True
