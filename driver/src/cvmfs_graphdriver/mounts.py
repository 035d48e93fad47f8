"""Mount system calls and what the kernel says about mounts (the driver's edge to the OS)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional

from . import whiteouts
from .errors import DriverError

log = logging.getLogger(__name__)

MNT_DETACH = 2
MS_RDONLY = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# filesystem magic numbers (statfs f_type) -> names, for the Status rows
_FS_NAMES = {
    0xEF53: "extfs", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
    0x794C7630: "overlayfs", 0x2FC12FC1: "zfs", 0x6969: "nfs", 0x65735546: "fuse",
    0x5346544E: "ntfs", 0x52654973: "reiserfs", 0x858458F6: "ramfs", 0xFF534D42: "cifs",
    0x47504653: "gpfs", 0x0BD00BD0: "lustre",
}
OVERLAY_MAGIC = 0x794C7630


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount_overlay(data: str, target: str, relative_to: Optional[str] = None) -> None:
    """Mount an overlay at `target`. With `relative_to`, paths in `data` are relative to it.

    A threaded daemon must not chdir (the working directory is per process), so relative
    mounts are made by mount(8) started in that directory (-n: no mtab, -i: no helper),
    which passes the options to the kernel as they are (a few milliseconds).
    """
    if relative_to is None:
        _check(_libc.mount(b"overlay", target.encode(), b"overlay", 0, data.encode()),
               f"mount overlay on {target}")
        return
    proc = subprocess.run(
        ["mount", "-n", "-i", "-t", "overlay", "overlay", "-o", data, target],
        cwd=relative_to, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise OSError(errno.EIO, f"mount overlay on {target} (from {relative_to}): "
                      f"{proc.stderr.strip() or proc.returncode}")


def unmount(target: str) -> None:
    """Lazily detach whatever is mounted at `target` (EINVAL: nothing was mounted)."""
    rc = _libc.umount2(target.encode(), MNT_DETACH)
    if rc != 0:
        e = ctypes.get_errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return
        raise OSError(e, f"unmount {target}: {os.strerror(e)}")


def is_mountpoint(path: str) -> bool:
    try:
        st = os.lstat(path)
        parent = os.lstat(os.path.dirname(path.rstrip("/")) or "/")
    except FileNotFoundError:
        return False
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


# ---------------------------------------------------------------------------- mountinfo


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fs_type: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < sep + 3 or sep < 6:
            continue
        entries.append(MountEntry(
            mount_point=_unescape(fields[4]),
            fs_type=fields[sep + 1],
            source=_unescape(fields[sep + 2]),
            options=fields[5],
        ))
    return entries


def read_mountinfo() -> List[MountEntry]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_under(prefix: str, entries: Optional[List[MountEntry]] = None) -> List[str]:
    """Mount points strictly below `prefix`, deepest first (the order to unmount them)."""
    prefix = prefix.rstrip("/") + "/"
    points = [m.mount_point for m in (entries if entries is not None else read_mountinfo())
              if m.mount_point.startswith(prefix)]
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def backing_mount(path: str, entries: Optional[List[MountEntry]] = None) -> Optional[MountEntry]:
    """The mount that holds `path` (longest mount-point prefix)."""
    path = os.path.realpath(path)
    best: Optional[MountEntry] = None
    for m in entries if entries is not None else read_mountinfo():
        mp = m.mount_point.rstrip("/") or "/"
        if (path == mp or path.startswith(mp + "/") or mp == "/") and (
            best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")
        ):
            best = m
    return best


# ---------------------------------------------------------------------------- statfs


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("rest", ctypes.c_byte * 256)]


_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def fs_magic(path: str) -> int:
    buf = _Statfs()
    _check(_libc.statfs(path.encode(), ctypes.byref(buf)), f"statfs {path}")
    return buf.f_type & 0xFFFFFFFF


def fs_name(path: str) -> str:
    magic = fs_magic(path)
    return _FS_NAMES.get(magic, f"unknown (0x{magic:x})")


class _Dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir64.restype = ctypes.POINTER(_Dirent64)
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
DT_UNKNOWN = 0


def supports_d_type(path: str) -> bool:
    """Whether the filesystem at `path` fills in d_type (overlayfs needs it; xfs ftype=1)."""
    with tempfile.TemporaryDirectory(prefix="d_type-check-", dir=path) as d:
        open(os.path.join(d, "f"), "w").close()
        dirp = _libc.opendir(d.encode())
        if not dirp:
            raise OSError(ctypes.get_errno(), f"opendir {d}")
        try:
            while True:
                ent = _libc.readdir64(dirp)
                if not ent:
                    return True
                if ent.contents.d_name == b"f":
                    return ent.contents.d_type != DT_UNKNOWN
        finally:
            _libc.closedir(dirp)


def supports_native_diff(home: str) -> bool:
    """Whether a tar of an upper dir is an exact diff on this kernel (moby's probe).

    Not when opaque flags are wrongly copied up (kernels before 4.8), or when the kernel
    records renamed directories as redirects (CONFIG_OVERLAY_FS_REDIRECT_DIR).
    """
    with tempfile.TemporaryDirectory(prefix="native-diff-check-", dir=home) as td:
        for d in ("l1/d", "l1/d1", "l2/d", "l3", "work", "merged"):
            os.makedirs(os.path.join(td, d))
        whiteouts.set_opaque(os.path.join(td, "l2", "d"))
        opts = f"lowerdir={td}/l2:{td}/l1,upperdir={td}/l3,workdir={td}/work"
        merged = os.path.join(td, "merged")
        try:
            mount_overlay(opts, merged)
        except OSError as e:
            raise DriverError(
                f"cannot mount overlayfs in {home}: {e}. Check that the kernel has overlay "
                "(grep overlay /proc/filesystems) and that the home is not itself on overlayfs."
            ) from None
        try:
            with open(os.path.join(merged, "d", "f"), "w"):
                pass
            if whiteouts.is_opaque(os.path.join(td, "l3", "d")):
                log.info("native diff off: opaque flag copied up (kernel older than 4.8)")
                return False
            try:
                os.rename(os.path.join(merged, "d1"), os.path.join(merged, "d2"))
            except OSError as e:
                if e.errno == errno.EXDEV:
                    return True  # no redirect_dir: renames of lower dirs are refused
                raise
            try:
                if os.getxattr(os.path.join(td, "l3", "d2"), whiteouts.REDIRECT_XATTR):
                    log.info("native diff off: kernel records directory renames as redirects")
                    return False
            except OSError:
                pass
            return True
        finally:
            unmount(merged)


def syncfs(path: str) -> None:
    """Flush the filesystem holding `path` to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.syncfs(fd), f"syncfs {path}")
    finally:
        os.close(fd)


def overlay_index_param() -> bool:
    """Whether the kernel knows overlay's `index` option (then we pass index=off as overlay2)."""
    return os.path.exists("/sys/module/overlay/parameters/index")
