"""Layer tars in and out: safe extraction, overlay whiteout conversion, diffs and changes.

Extraction never follows a symlink and never resolves a name outside the layer
directory: every entry is reached by walking its parent directories one component at
a time with O_NOFOLLOW from a file descriptor of the layer root, so `../x`, absolute
names, symlinked parents and hard links to outside cannot escape (they are refused).

Whiteouts follow overlay2: on the way in `.wh.NAME` becomes a 0:0 character device
NAME and `.wh..wh..opq` the xattr trusted.overlay.opaque=y on its directory; on the way
out both are turned back into the marker files.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .errors import DriverError, UnsafeLayerError

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
CAPABILITY_XATTR = "security.capability"
PAX_XATTR = "SCHILY.xattr."

CHANGE_MODIFY, CHANGE_ADD, CHANGE_DELETE = 0, 1, 2

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- names


def split_member_name(name: str, what: str = "entry") -> List[str]:
    """Split a tar member name into safe components, or refuse it.

    "./a/b" and "a//b/" are fine; absolute names and any ".." component are refused.
    An empty list means the layer root itself (".").
    """
    if "\x00" in name:
        raise UnsafeLayerError(f"tar {what} {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeLayerError(
            f"tar {what} {name!r} is an absolute path; layer tars must use relative names"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayerError(f"tar {what} {name!r} climbs out of the layer with '..'")
    return parts


def is_whiteout_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# ---------------------------------------------------------------------------- fd helpers


def _open_dir_at(dir_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeLayerError(
                f"{shown!r} is a symlink or not a directory; refusing to write through it"
            ) from None
        raise


def _lstat_at(dir_fd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str) -> None:
    """Remove `name` (a whole tree if a directory) without following symlinks."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _proc_path(dir_fd: int, name: str) -> str:
    # A single name below a pinned directory fd: safe for calls that only take paths.
    return f"/proc/self/fd/{dir_fd}/{name}"


class _DirWalker:
    """Opens parent directories of tar entries below a root fd, creating missing ones."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._cached: Optional[Tuple[Tuple[str, ...], int]] = None

    def open_parent(self, parts: Sequence[str], *, create: bool, shown: str) -> int:
        """Return an fd (owned by the walker: do not close) for the directory `parts`."""
        key = tuple(parts)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self.forget()
        fd = _open_dirs(
            self.root_fd, parts, create=create,
            refuse=lambda where: f"tar entry {shown!r}: its parent {where!r} is a symlink or "
            "not a directory; refusing to write through it",
        )
        self._cached = (key, fd)
        return fd

    def forget(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None


# ---------------------------------------------------------------------------- apply


def _ns(member: tarfile.TarInfo, key: str, fallback: int) -> int:
    raw = member.pax_headers.get(key)
    if raw:
        try:
            sec, _, frac = raw.partition(".")
            return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or 0) * (
                -1 if sec.startswith("-") else 1
            )
        except ValueError:
            pass
    return fallback


def _member_times(member: tarfile.TarInfo) -> Tuple[int, int]:
    mtime = _ns(member, "mtime", int(member.mtime) * 1_000_000_000)
    atime = _ns(member, "atime", mtime)
    return (max(atime, mtime), mtime)


def _member_xattrs(member: tarfile.TarInfo) -> Dict[str, bytes]:
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith(PAX_XATTR):
            name = key[len(PAX_XATTR) :]
            if name.startswith("trusted.overlay."):
                # Only the driver sets overlay's own attributes (from whiteout markers).
                log.warning("tar entry %r: ignoring xattr %s", member.name, name)
                continue
            out[name] = value.encode("utf-8", "surrogateescape")
    return out


@dataclass
class ApplyResult:
    entries: int = 0
    whiteouts: int = 0


WHITEOUT_MODES = ("overlay", "keep", "apply")


def apply_tar(stream: IO[bytes], root: str, whiteouts: str = "overlay") -> ApplyResult:
    """Extract an uncompressed layer tar into the directory `root`.

    whiteouts: "overlay" turns `.wh.` markers into overlayfs whiteouts (a layer dir);
    "keep" stores them as the plain files they are (a published layer, as DUCC does);
    "apply" deletes what they name (flattening layers into one tree).
    """
    if whiteouts not in WHITEOUT_MODES:
        raise ValueError(f"whiteouts must be one of {WHITEOUT_MODES}")
    written: Set[str] = set()  # entries of this tar, for opaque dirs in "apply" mode
    root_fd = os.open(root, _DIR_FLAGS)
    walker = _DirWalker(root_fd)
    result = ApplyResult()
    dir_times: List[Tuple[List[str], Tuple[int, int]]] = []
    try:
        try:
            tar = tarfile.open(  # noqa: SIM115 (closed by the with below)
                fileobj=stream, mode="r|", errors="surrogateescape", bufsize=_COPY_CHUNK
            )
        except tarfile.ReadError as e:
            raise DriverError(f"layer data is not a valid uncompressed tar: {e}") from None
        with tar:
            try:
                for member in tar:
                    result.entries += 1
                    _apply_member(tar, member, root_fd, walker, dir_times, result,
                                  whiteouts, written)
            except tarfile.TarError as e:
                raise DriverError(f"layer tar is corrupt or truncated: {e}") from None
        walker.forget()
        for parts, times in reversed(dir_times):
            _set_dir_times(root_fd, parts, times)
    finally:
        walker.forget()
        os.close(root_fd)
    return result


def _apply_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    root_fd: int,
    walker: _DirWalker,
    dir_times: List[Tuple[List[str], Tuple[int, int]]],
    result: ApplyResult,
    whiteouts: str = "overlay",
    written: Optional[Set[str]] = None,
) -> None:
    parts = split_member_name(member.name)
    if not parts:
        if not member.isdir():
            raise UnsafeLayerError(
                f"tar entry {member.name!r} names the layer root but is not a directory"
            )
        _set_metadata(root_fd, None, member, is_link=False)
        dir_times.append(([], _member_times(member)))
        return
    shown = "/".join(parts)
    base = parts[-1]
    parent = parts[:-1]

    if base.startswith(WHITEOUT_PREFIX) and whiteouts == "apply":
        pfd = walker.open_parent(parent, create=True, shown=shown)
        if base == WHITEOUT_OPAQUE:
            prefix = "/".join(parent)
            for child in os.listdir(pfd):
                if (f"{prefix}/{child}" if prefix else child) not in (written or ()):
                    remove_at(pfd, child)
        elif not base.startswith(WHITEOUT_META_PREFIX):
            target = base[len(WHITEOUT_PREFIX) :]
            if target in ("", ".", ".."):
                raise UnsafeLayerError(f"tar entry {shown!r} is a whiteout of an invalid name")
            remove_at(pfd, target)
        result.whiteouts += 1
        return
    if base.startswith(WHITEOUT_PREFIX) and whiteouts == "overlay":
        pfd = walker.open_parent(parent, create=True, shown=shown)
        if base == WHITEOUT_OPAQUE:
            os.setxattr(_proc_path_dir(pfd), OPAQUE_XATTR, b"y")
        elif base.startswith(WHITEOUT_META_PREFIX):
            log.debug("skipping AUFS metadata entry %r", shown)
        else:
            target = base[len(WHITEOUT_PREFIX) :]
            if target in ("", ".", ".."):
                raise UnsafeLayerError(f"tar entry {shown!r} is a whiteout of an invalid name")
            remove_at(pfd, target)
            os.mknod(target, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
            os.chown(target, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        result.whiteouts += 1
        return

    pfd = walker.open_parent(parent, create=True, shown=shown)
    if written is not None:
        written.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    existing = _lstat_at(pfd, base)
    if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
        remove_at(pfd, base)

    if member.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            _set_metadata(fd, None, member, is_link=False)
        finally:
            os.close(fd)
        dir_times.append((parts, _member_times(member)))
    elif member.isreg():
        fd = os.open(
            base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=pfd,
        )
        try:
            src = tar.extractfile(member)
            if src is not None:
                with open(fd, "wb", buffering=_COPY_CHUNK, closefd=False) as dst:
                    while True:
                        chunk = src.read(_COPY_CHUNK)
                        if not chunk:
                            break
                        dst.write(chunk)
            _set_metadata(fd, None, member, is_link=False)
            os.utime(fd, ns=_member_times(member))
        finally:
            os.close(fd)
    elif member.issym():
        os.symlink(member.linkname, base, dir_fd=pfd)
        _set_metadata(pfd, base, member, is_link=True)
        os.utime(base, ns=_member_times(member), dir_fd=pfd, follow_symlinks=False)
    elif member.islnk():
        try:
            tparts = split_member_name(member.linkname, "hard link target")
        except UnsafeLayerError as e:
            raise UnsafeLayerError(f"tar entry {shown!r}: {e}") from None
        if not tparts:
            raise UnsafeLayerError(f"tar entry {shown!r} is a hard link to the layer root")
        tshown = "/".join(tparts)
        try:
            tfd = _open_existing_dir(root_fd, tparts[:-1], shown)
        except FileNotFoundError:
            raise DriverError(
                f"tar entry {shown!r} is a hard link to {tshown!r}, which is not in this layer"
            ) from None
        try:
            tst = _lstat_at(tfd, tparts[-1])
            if tst is None:
                raise DriverError(
                    f"tar entry {shown!r} is a hard link to {tshown!r}, which is not in this layer"
                )
            if stat.S_ISDIR(tst.st_mode):
                raise UnsafeLayerError(f"tar entry {shown!r} is a hard link to a directory")
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        _set_metadata(pfd, base, member, is_link=stat.S_ISLNK(tst.st_mode))
        if not stat.S_ISLNK(tst.st_mode):
            os.utime(_proc_path(pfd, base), ns=_member_times(member))
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
        dev = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        _set_metadata(pfd, base, member, is_link=False)
        os.utime(base, ns=_member_times(member), dir_fd=pfd, follow_symlinks=False)
    else:
        raise DriverError(
            f"tar entry {shown!r} has unsupported type {member.type!r}; "
            "layers may hold files, directories, links, devices and FIFOs"
        )


def _open_dirs(root_fd: int, parts: Sequence[str], *, create: bool,
               refuse: Callable[[str], str]) -> int:
    """Open the directory `parts` below `root_fd` one component at a time, never following
    a symlink. Missing directories are made (0755, whatever the umask) when `create`;
    `refuse(where)` words the error for a component that is a symlink or not a directory.
    """
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            where = "/".join(parts[: i + 1])
            try:
                nfd = _open_dir_at(fd, part, where)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = _open_dir_at(fd, part, where)
                os.chmod(nfd, 0o755)  # as moby's untar makes missing parents, any umask
            except UnsafeLayerError:
                raise UnsafeLayerError(refuse(where)) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_existing_dir(root_fd: int, parts: Sequence[str], shown: str) -> int:
    return _open_dirs(
        root_fd, parts, create=False,
        refuse=lambda where: f"tar entry {shown!r}: hard link target goes through {where!r}, "
        "a symlink or non-directory",
    )


def _proc_path_dir(dir_fd: int) -> str:
    return f"/proc/self/fd/{dir_fd}"


def _set_metadata(fd: int, name: Optional[str], member: tarfile.TarInfo, *, is_link: bool) -> None:
    """Owner, xattrs, then mode (chown clears setuid bits, so mode comes last).

    With `name` None, `fd` is the object itself; otherwise `name` is an entry in dir `fd`.
    """
    if name is None:
        os.chown(fd, member.uid, member.gid)
        path = _proc_path_dir(fd)
    else:
        os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        path = _proc_path(fd, name)
    for key, value in _member_xattrs(member).items():
        try:
            if name is None:
                # fsetxattr: lsetxattr on the /proc/self/fd magic link itself is ENOTSUP.
                os.setxattr(fd, key, value)
            else:
                os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM):
                log.warning("tar entry %r: cannot set xattr %s: %s", member.name, key, e)
                continue
            raise
    if not is_link:
        if name is None:
            os.chmod(fd, member.mode & 0o7777)
        else:
            os.chmod(path, member.mode & 0o7777)


def _set_dir_times(root_fd: int, parts: List[str], times: Tuple[int, int]) -> None:
    try:
        fd = _open_existing_dir(root_fd, parts, "/".join(parts))
    except (OSError, UnsafeLayerError):
        return  # replaced by a later entry
    try:
        os.utime(fd, ns=times)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- walking


def walk(root: str) -> Iterator[Tuple[str, os.stat_result]]:
    """Yield ("/rel/path", lstat) depth-first in byte order of names, like Go's Walk."""

    def rec(dir_path: str, rel: str) -> Iterator[Tuple[str, os.stat_result]]:
        try:
            names = sorted(os.listdir(dir_path), key=os.fsencode)
        except FileNotFoundError:
            return
        for name in names:
            full = os.path.join(dir_path, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            r = f"{rel}/{name}"
            yield r, st
            if stat.S_ISDIR(st.st_mode):
                yield from rec(full, r)

    yield from rec(root, "")


def directory_size(root: str) -> int:
    """Bytes of all non-directories, hard links counted once (moby's directory.Size)."""
    seen = set()
    total = 0
    for _, st in walk(root):
        if stat.S_ISDIR(st.st_mode) or st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        total += st.st_size
    return total


def _getxattr(path: str, name: str) -> Optional[bytes]:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def is_opaque(path: str) -> bool:
    return _getxattr(path, OPAQUE_XATTR) == b"y"


# ---------------------------------------------------------------------------- tar out


class TarWriter:
    """Writes tar entries the way moby's archiver does (PAX, whole-second mtimes)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._tar = tarfile.open(  # noqa: SIM115 (closed by close())
            fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
        )
        self._inodes: Dict[Tuple[int, int], str] = {}

    def add(self, full: str, name: str, st: os.stat_result) -> None:
        ti = tarfile.TarInfo(name)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = int(st.st_mtime)
        cap = None if stat.S_ISLNK(st.st_mode) else _getxattr(full, CAPABILITY_XATTR)
        if cap is not None:
            ti.pax_headers = {PAX_XATTR + CAPABILITY_XATTR: cap.decode("utf-8", "surrogateescape")}
        mode = st.st_mode
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self._inodes.get(key)
            if first is not None:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first
                self._tar.addfile(ti)
                return
            self._inodes[key] = name
        if stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
            self._tar.addfile(ti)
        elif stat.S_ISREG(mode):
            ti.type = tarfile.REGTYPE
            ti.size = st.st_size
            with open(full, "rb") as f:
                self._tar.addfile(ti, f)
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(full)
            self._tar.addfile(ti)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self._tar.addfile(ti)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
            self._tar.addfile(ti)
        else:
            log.debug("skipping %s: sockets cannot be stored in a tar", full)

    def add_marker(self, name: str, st: Optional[os.stat_result], mode: int = 0o600) -> None:
        """An empty regular file (a whiteout or opaque marker)."""
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.REGTYPE
        ti.mode = mode
        if st is not None:
            ti.uid, ti.gid = st.st_uid, st.st_gid
            ti.mtime = int(st.st_mtime)
        else:
            ti.mtime = 0
        ti.uname = ti.gname = ""
        self._tar.addfile(ti)

    def close(self) -> None:
        # End with two zero blocks and nothing more, as Go's archive/tar does. tarfile would
        # pad to a 10 KiB record, and dockerd hashes the whole stream: an unchanged container
        # would then commit as a non-empty layer instead of Docker's empty layer.
        tar: Any = self._tar  # tarfile internals, stable since Python 3.2 (tested)
        if tar.closed:
            return
        tar.closed = True
        tar.fileobj.write(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
        tar.offset += tarfile.BLOCKSIZE * 2
        tar.fileobj.close()  # flushes the stream buffer; the caller's `out` stays open


def write_native_diff(out: IO[bytes], diff_dir: str) -> None:
    """Tar of an overlay upper/diff dir with whiteouts turned back into marker files."""
    tw = TarWriter(out)
    for rel, st in walk(diff_dir):
        full = diff_dir + rel
        name = rel[1:]
        if is_whiteout_device(st):
            head, _, base = name.rpartition("/")
            tw.add_marker(f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base, st)
            continue
        tw.add(full, name, st)
        if stat.S_ISDIR(st.st_mode) and is_opaque(full):
            tw.add_marker(f"{name}/{WHITEOUT_OPAQUE}", st, mode=stat.S_IMODE(st.st_mode) & 0o777)
    tw.close()


def export_changes(out: IO[bytes], root: str, changes: List[Change]) -> None:
    """Tar of the given changes, files read from `root` (moby's ExportChanges)."""
    tw = TarWriter(out)
    for change in sorted(changes, key=lambda c: os.fsencode(c.path)):
        if change.kind == CHANGE_DELETE:
            head, _, base = change.path[1:].rpartition("/")
            tw.add_marker(f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base,
                          None)
            continue
        full = root + change.path
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue  # the container changed under us; moby skips it too
        tw.add(full, change.path[1:], st)
    tw.close()


# ---------------------------------------------------------------------------- changes


@dataclass(frozen=True)
class Change:
    path: str
    kind: int

    def to_json(self) -> dict:
        return {"Path": self.path, "Kind": self.kind}


def _same_time(a: int, b: int) -> bool:
    # Tar has whole seconds: equal, or the same second with one side at .0 exactly.
    return a == b or (
        a // 1_000_000_000 == b // 1_000_000_000
        and (a % 1_000_000_000 == 0 or b % 1_000_000_000 == 0)
    )


@dataclass
class _Node:
    st: Optional[os.stat_result]
    cap: Optional[bytes]
    children: Dict[str, _Node]


def _collect(old_dir: str, new_dir: str) -> Tuple[_Node, _Node]:
    """Both trees, pruning subtrees that are the same inode on the same device."""
    old_root = _Node(None, None, {})
    new_root = _Node(None, None, {})

    def entries(d: Optional[str]) -> Dict[str, int]:
        if d is None:
            return {}
        with os.scandir(d) as it:
            return {e.name: e.inode() for e in it}

    def rec(rel: str, o: Optional[os.stat_result], n: Optional[os.stat_result],
            on: _Node, nn: _Node) -> None:
        o_dir = o is not None and stat.S_ISDIR(o.st_mode)
        n_dir = n is not None and stat.S_ISDIR(n.st_mode)
        if not o_dir and not n_dir:
            return
        same_dev = o is not None and n is not None and o.st_dev == n.st_dev
        onames = entries(old_dir + rel if o_dir else None)
        nnames = entries(new_dir + rel if n_dir else None)
        for name in sorted(set(onames) | set(nnames), key=os.fsencode):
            if name in onames and name in nnames and onames[name] == nnames[name] and same_dev:
                continue
            crel = f"{rel}/{name}"
            cst_o = _lstat_path(old_dir + crel) if o_dir else None
            cst_n = _lstat_path(new_dir + crel) if n_dir else None
            con = _Node(cst_o, _cap(old_dir + crel, cst_o), {})
            cnn = _Node(cst_n, _cap(new_dir + crel, cst_n), {})
            if cst_o is not None:
                on.children[name] = con
            if cst_n is not None:
                nn.children[name] = cnn
            rec(crel, cst_o, cst_n, con, cnn)

    rec("", os.lstat(old_dir), os.lstat(new_dir), old_root, new_root)
    return old_root, new_root


def _lstat_path(p: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None


def _cap(p: str, st: Optional[os.stat_result]) -> Optional[bytes]:
    if st is None or stat.S_ISLNK(st.st_mode):
        return None
    return _getxattr(p, CAPABILITY_XATTR)


def _stat_different(o: os.stat_result, n: os.stat_result) -> bool:
    if (o.st_mode, o.st_uid, o.st_gid, o.st_rdev) != (n.st_mode, n.st_uid, n.st_gid, n.st_rdev):
        return True
    # moby tests `mode & S_IFDIR != S_IFDIR`, so block devices (and sockets) share the
    # directories' exemption from the mtime/size comparison.
    if o.st_mode & stat.S_IFDIR != stat.S_IFDIR:
        return not _same_time(o.st_mtime_ns, n.st_mtime_ns) or o.st_size != n.st_size
    return False


def changes_dirs(new_dir: str, old_dir: Optional[str]) -> List[Change]:
    """Changes between two whole trees (moby's ChangesDirs; `old_dir` None = empty)."""
    if old_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory() as empty:
            return changes_dirs(new_dir, empty)
    old_root, new_root = _collect(old_dir, new_dir)
    changes: List[Change] = []

    def add(path: str, info: _Node, old: Optional[_Node], added: bool) -> None:
        at_entry = len(changes)
        if old is None and path != "/":
            changes.append(Change(path, CHANGE_ADD))
            added = True
        is_dir = info.st is None or stat.S_ISDIR(info.st.st_mode)
        old_children = dict(old.children) if old is not None and is_dir else {}
        for name in sorted(info.children, key=os.fsencode):
            child = info.children[name]
            cpath = f"{path.rstrip('/')}/{name}"
            ochild = old_children.pop(name, None)
            child_added = False
            if ochild is not None:
                assert ochild.st is not None and child.st is not None
                if _stat_different(ochild.st, child.st) or ochild.cap != child.cap:
                    changes.append(Change(cpath, CHANGE_MODIFY))
                    child_added = True
            add(cpath, child, ochild, child_added)
        for name in sorted(old_children, key=os.fsencode):
            changes.append(Change(f"{path.rstrip('/')}/{name}", CHANGE_DELETE))
        if len(changes) > at_entry and is_dir and not added and path != "/":
            changes.insert(at_entry, Change(path, CHANGE_MODIFY))

    add("/", new_root, old_root, False)
    return changes


def changes_size(root: str, changes: Sequence[Change]) -> int:
    """Bytes of added and modified non-directories under `root` (moby's ChangesSize)."""
    seen = set()
    total = 0
    for change in changes:
        if change.kind == CHANGE_DELETE:
            continue
        st = _lstat_path(root + change.path)
        if st is None or stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_size
    return total


WriteFn = Callable[[bytes], object]
