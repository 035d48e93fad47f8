"""Layer tars in and out: safe extraction, layer tars as moby writes them, changes.

Extraction never follows a symlink and never resolves a name outside the layer
directory: every entry is reached by walking its parent directories one component at
a time with O_NOFOLLOW from a file descriptor of the layer root (fdtree), so `../x`,
absolute names, symlinked parents and hard links to outside cannot escape (they are
refused). Whiteout markers are handed to a converter (whiteouts).

Layer tars are written as moby's archive package writes them (tarformat), read through
directory descriptors as well (fdtree.DirStack, any depth): `write_layer_tar` is
overlay2's native Diff (TarWithOptions with the overlay whiteout converter),
`export_changes` its naive Diff (ExportChanges of what changes.py found).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tarfile
import time
from dataclasses import dataclass
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from . import fdtree, tarformat, tarread, whiteouts
from .changes import CHANGE_DELETE, Change
from .errors import DriverError, UnsafeLayerError

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20
_T = TypeVar("_T")


# ---------------------------------------------------------------------------- names

# Linux's limits (linux/limits.h): a name component is at most NAME_MAX bytes, a symlink
# target shorter than PATH_MAX (with its terminating NUL). A whole name may be longer
# than PATH_MAX: entries are reached one component at a time (fdtree), trees as deep as
# the kernel allows (moby's Unpack, which opens whole paths, fails on them).
PATH_MAX = 4096
NAME_MAX = 255


def split_member_name(name: str, what: str = "entry") -> List[str]:
    """Split a tar member name into safe components, or refuse it.

    "./a/b" and "a//b/" are fine; absolute names and any ".." component are refused, and
    so is a component longer than Linux holds (NAME_MAX).
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
    for i, part in enumerate(parts):
        size = len(part.encode("utf-8", "surrogateescape"))
        # A whiteout marker (the last component) stands for the name it deletes, which
        # is what must fit: '.wh.' + a name of 255 bytes is a valid marker.
        marker = i == len(parts) - 1 and part.startswith(whiteouts.PREFIX)
        if size > NAME_MAX + (len(whiteouts.PREFIX) if marker else 0):
            raise DriverError(f"tar {what} {_cut(name)!r} has a component of {size} bytes; "
                              f"Linux names are at most {NAME_MAX} bytes (NAME_MAX)")
    return parts


def _cut(name: str, keep: int = 200) -> str:
    """A name shortened for a message (an error quoting 4 KiB of it helps nobody)."""
    return name if len(name) <= keep else f"{name[:keep // 2]}...{name[-keep // 2:]}"


# ---------------------------------------------------------------------------- apply


# What an entry's fields may hold: what the system calls setting them take, and what Go's
# archive/tar (dockerd's reader) parses. Times are int64 seconds (time_t; Go's
# parsePAXTime and parseNumeric refuse more), owners 0 to 2^32-2 (chown takes 32 bits
# and (uid_t)-1 means "leave the owner as it is": the daemon's root), devices Linux's 12-bit
# major and 20-bit minor numbers (mknod's dev_t), xattr names and values as
# Linux's XATTR_NAME_MAX and XATTR_SIZE_MAX.
_TIME_MIN, _TIME_MAX = -(1 << 63), (1 << 63) - 1
_ID_MAX = (1 << 32) - 2
_MAJOR_MAX, _MINOR_MAX = (1 << 12) - 1, (1 << 20) - 1
_XATTR_NAME_MAX, _XATTR_SIZE_MAX = 255, 65536
_PAX_TIME = re.compile(r"([+-]?[0-9]+)(?:\.([0-9]*))?")  # Go's parsePAXTime
_PAX_INT = re.compile(r"[+-]?[0-9]+")  # Go's strconv.ParseInt(v, 10, 64)


def _ns(member: tarfile.TarInfo, key: str, fallback: int, shown: str) -> int:
    """A PAX time record in nanoseconds ("seconds[.fraction]"), or `fallback` without one."""
    raw = member.pax_headers.get(key)
    if not raw:
        return fallback
    m = _PAX_TIME.fullmatch(raw)
    if m is None:
        raise DriverError(f"tar entry {shown!r}: PAX {key} {raw[:40]!r} is not a time "
                          "(seconds since 1970, an optional fraction)")
    if not _TIME_MIN <= int(m.group(1)) <= _TIME_MAX:
        raise DriverError(f"tar entry {shown!r}: PAX {key} {raw[:40]!r} is beyond what a "
                          "64-bit time holds")
    frac = int(((m.group(2) or "") + "000000000")[:9])
    return int(m.group(1)) * 1_000_000_000 + (-frac if raw.startswith("-") else frac)


def _member_times(member: tarfile.TarInfo, shown: str) -> Tuple[int, int]:
    """(atime, mtime) in nanoseconds, as utimensat takes them."""
    if member.pax_headers.get("mtime"):  # an empty record is none (as Go reads it)
        mtime = _ns(member, "mtime", 0, shown)
    elif isinstance(member.mtime, int) and _TIME_MIN <= member.mtime <= _TIME_MAX:
        mtime = member.mtime * 1_000_000_000
    else:
        raise DriverError(f"tar entry {shown!r}: its mtime {member.mtime!r} is beyond what "
                          "a 64-bit time holds")
    atime = _ns(member, "atime", mtime, shown)
    return (max(atime, mtime), mtime)


def _member_xattrs(member: tarfile.TarInfo, shown: str) -> Dict[str, bytes]:
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith(tarformat.PAX_XATTR):
            name = key[len(tarformat.PAX_XATTR) :]
            if whiteouts.is_overlay_xattr(name):
                # Only the driver sets overlay's own attributes (from whiteout markers).
                log.warning("tar entry %r: ignoring xattr %s", shown, name)
                continue
            raw = value.encode("utf-8", "surrogateescape")
            size = len(name.encode("utf-8", "surrogateescape"))
            if "\x00" in name or not 0 < size <= _XATTR_NAME_MAX:
                raise DriverError(f"tar entry {shown!r}: xattr name {_cut(name)!r} is not a "
                                  f"name (1 to {_XATTR_NAME_MAX} bytes, no NUL byte)")
            if len(raw) > _XATTR_SIZE_MAX:
                raise DriverError(f"tar entry {shown!r}: xattr {name!r} holds {len(raw)} "
                                  f"bytes; Linux takes at most {_XATTR_SIZE_MAX}")
            out[name] = raw
    return out


def _check_member(member: tarfile.TarInfo,
                  shown: str) -> Tuple[Tuple[int, int], Dict[str, bytes]]:
    """Refuse, naming the entry, a field no system call could set (before anything of
    the entry is made): the error would otherwise be an OverflowError or ValueError.
    Returns what the entry's times and xattrs are set to."""
    for key in ("uid", "gid", "size"):
        raw = member.pax_headers.get(key)
        if raw and not _PAX_INT.fullmatch(raw):
            raise DriverError(f"tar entry {shown!r}: PAX {key} {raw[:40]!r} is not a number")
    for what, value in (("uid", member.uid), ("gid", member.gid)):
        if not 0 <= value <= _ID_MAX:
            raise DriverError(f"tar entry {shown!r}: its {what} {value} is out of range "
                              f"(0 to {_ID_MAX})")
    times = _member_times(member, shown)
    xattrs = _member_xattrs(member, shown)
    if member.issym():
        if "\x00" in member.linkname:
            raise UnsafeLayerError(f"tar entry {shown!r}: its symlink target "
                                   f"{member.linkname!r} contains a NUL byte")
        if len(member.linkname.encode("utf-8", "surrogateescape")) >= PATH_MAX:
            raise DriverError(f"tar entry {shown!r}: its symlink target "
                              f"{_cut(member.linkname)!r} is {PATH_MAX} bytes or longer "
                              "(PATH_MAX)")
    if (member.ischr() or member.isblk()) and not (
            0 <= member.devmajor <= _MAJOR_MAX and 0 <= member.devminor <= _MINOR_MAX):
        raise DriverError(f"tar entry {shown!r}: device {member.devmajor}:{member.devminor} "
                          f"is out of range (major 0 to {_MAJOR_MAX}, minor 0 to {_MINOR_MAX})")
    return times, xattrs


@dataclass
class ApplyResult:
    entries: int = 0
    whiteouts: int = 0
    bytes: int = 0  # the sizes in the entries' headers, summed (moby's UnpackLayer size)


def apply_tar(stream: IO[bytes], root: str, converter: Optional[whiteouts.Converter],
              max_bytes: int = 0) -> ApplyResult:
    """Extract an uncompressed layer tar into the directory `root`.

    `converter` says what whiteout markers become (whiteouts.OverlayUpper for a layer's
    diff dir, whiteouts.Flatten to flatten layers); without one they are stored as the
    plain files they are (a published layer, as DUCC stores them). The layer's files may
    take `max_bytes` (0: no limit of its own) and never more than is free (see
    tarread.SizeBudget). The tar is read within tarread's bounds and must end with its
    end-of-archive marker.
    """
    root_fd = os.open(root, fdtree.DIR_FLAGS)
    walker = fdtree.DirStack(root_fd)  # where the entries go, in the tar's order
    result = ApplyResult()
    budget = tarread.SizeBudget(root_fd, max_bytes)
    dir_times: List[Tuple[List[str], Tuple[int, int]]] = []
    try:
        try:
            tar = tarread.open_layer(stream, _COPY_CHUNK)
        except tarfile.ReadError as e:
            raise DriverError(f"layer data is not a valid uncompressed tar: {e}") from None
        with tar:
            try:
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    result.entries += 1
                    result.bytes += member.size
                    _apply_member(tar, member, root_fd, walker, dir_times, result, converter,
                                  budget)
                tarread.check_end(tar)
            except tarfile.TarError as e:
                raise DriverError(f"layer tar is corrupt or truncated "
                                  f"{tar.chain.where()}: {e}") from None
        for parts, times in reversed(dir_times):
            _set_dir_times(walker, parts, times)
    finally:
        walker.close()
        os.close(root_fd)
    return result


def _apply_member(
    tar: tarread.LayerTarFile,
    member: tarfile.TarInfo,
    root_fd: int,
    walker: fdtree.DirStack,
    dir_times: List[Tuple[List[str], Tuple[int, int]]],
    result: ApplyResult,
    converter: Optional[whiteouts.Converter],
    budget: tarread.SizeBudget,
) -> None:
    parts = split_member_name(member.name)
    times, xattrs = _check_member(member, "/".join(parts) or member.name)
    if not parts:
        if not member.isdir():
            raise UnsafeLayerError(
                f"tar entry {member.name!r} names the layer root but is not a directory"
            )
        # As moby's Unpack (overlay2's ApplyDiff): the root's own entry changes nothing
        # (a tar made as a user would otherwise hand the layer root to that user).
        return
    shown = "/".join(parts)
    base = parts[-1]
    fdtree.go_to(walker, parts[:-1], create=True, refuse=lambda where: (
        f"tar entry {shown!r}: its parent {where!r} is a symlink or not a directory; "
        "refusing to write through it"))
    pfd = walker.fd
    if whiteouts.apply_marker(converter, pfd, parts, member.uid, member.gid):
        result.whiteouts += 1
        return
    if isinstance(converter, whiteouts.Flatten):
        converter.wrote(parts)
    # Each kind is made with O_EXCL semantics; a name taken already (by an earlier entry of
    # the tar, or a lower layer's file in a flattened tree) is then replaced: one system
    # call less per entry than looking first.
    if member.isdir():
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            existing = fdtree.lstat_at(pfd, base)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                fdtree.remove_at(pfd, base)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, fdtree.DIR_FLAGS, dir_fd=pfd)
        try:
            _set_metadata(fd, None, member, xattrs, shown, is_link=False)
        finally:
            os.close(fd)
        dir_times.append((parts, times))
    elif member.isreg():
        budget.take(member.size, shown)
        fd = _replacing(pfd, base, lambda: os.open(
            base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=pfd))
        try:
            tarread.write_data(tar, member, fd, shown, _COPY_CHUNK)
            _set_metadata(fd, None, member, xattrs, shown, is_link=False)
            os.utime(fd, ns=times)
        finally:
            os.close(fd)
    elif member.issym():
        _replacing(pfd, base, lambda: os.symlink(member.linkname, base, dir_fd=pfd))
        _set_metadata(pfd, base, member, xattrs, shown, is_link=True)
        os.utime(base, ns=times, dir_fd=pfd, follow_symlinks=False)
    elif member.islnk():
        fdtree.remove_at(pfd, base)  # first: the link's target may be this very name
        try:
            tparts = split_member_name(member.linkname, "hard link target")
        except DriverError as e:
            raise type(e)(f"tar entry {shown!r}: {e}") from None
        if not tparts:
            raise UnsafeLayerError(f"tar entry {shown!r} is a hard link to the layer root")
        tshown = "/".join(tparts)
        try:
            tfd = fdtree.open_dirs(
                root_fd, tparts[:-1], create=False,
                refuse=lambda where: f"tar entry {shown!r}: hard link target goes through "
                f"{where!r}, a symlink or non-directory",
            )
        except FileNotFoundError:
            raise DriverError(
                f"tar entry {shown!r} is a hard link to {tshown!r}, which is not in this layer"
            ) from None
        try:
            tst = fdtree.lstat_at(tfd, tparts[-1])
            if tst is None:
                raise DriverError(
                    f"tar entry {shown!r} is a hard link to {tshown!r}, which is not in this layer"
                )
            if stat.S_ISDIR(tst.st_mode):
                raise UnsafeLayerError(f"tar entry {shown!r} is a hard link to a directory")
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        _set_metadata(pfd, base, member, xattrs, shown, is_link=stat.S_ISLNK(tst.st_mode))
        if not stat.S_ISLNK(tst.st_mode):
            os.utime(fdtree.proc_path(pfd, base), ns=times)
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
        dev = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        _replacing(pfd, base, lambda: os.mknod(base, kind | 0o600, dev, dir_fd=pfd))
        _set_metadata(pfd, base, member, xattrs, shown, is_link=False)
        os.utime(base, ns=times, dir_fd=pfd, follow_symlinks=False)
    else:
        raise DriverError(
            f"tar entry {shown!r} has unsupported type {member.type!r}; "
            "layers may hold files, directories, links, devices and FIFOs"
        )


def _replacing(pfd: int, base: str, make: Callable[[], _T]) -> _T:
    """`make()` the entry `base` in the directory `pfd`, which fails if the name is
    taken; then what holds it (a whole tree if a directory) is removed and `make()` runs
    again."""
    try:
        return make()
    except FileExistsError:
        fdtree.remove_at(pfd, base)
        return make()


def _set_metadata(fd: int, name: Optional[str], member: tarfile.TarInfo,
                  xattrs: Dict[str, bytes], shown: str, *, is_link: bool) -> None:
    """Owner, xattrs, then mode (chown clears setuid bits, so mode comes last).

    With `name` None, `fd` is the object itself; otherwise `name` is an entry in dir `fd`.
    `shown` is the entry's name in messages; its fields passed _check_member.
    """
    if name is None:
        os.chown(fd, member.uid, member.gid)
    else:
        os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
    path = fdtree.proc_path(fd, name)
    for key, value in xattrs.items():
        try:
            if name is None:
                # fsetxattr: lsetxattr on the /proc/self/fd magic link itself is ENOTSUP.
                os.setxattr(fd, key, value)
            else:
                os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM):
                log.warning("tar entry %r: cannot set xattr %s: %s", shown, key, e)
                continue
            raise DriverError(f"tar entry {shown!r}: cannot set its xattr {key!r} "
                              f"({len(value)} bytes): {e.strerror}") from None
    if not is_link:
        if name is None:
            os.chmod(fd, member.mode & 0o7777)
        else:
            os.chmod(path, member.mode & 0o7777)


def _set_dir_times(stack: fdtree.DirStack, parts: List[str], times: Tuple[int, int]) -> None:
    try:
        fdtree.go_to(stack, parts, create=False, refuse=lambda where: where)
    except (OSError, UnsafeLayerError):
        return  # replaced by a later entry
    os.utime(stack.fd, ns=times)


# ---------------------------------------------------------------------------- tar out


class _Appender:
    """moby's tarAppender: entries from directory fds, hard links by inode (moby keys
    them by inode number alone), and the overlay whiteout converter when asked."""

    def __init__(self, out: IO[bytes], overlay: bool) -> None:
        self.stream = tarformat.TarStream(out, _COPY_CHUNK)
        self.overlay = overlay
        self.seen: Dict[int, bytes] = {}

    def add(self, dir_fd: int, name: str, rel: bytes, descend: bool) -> Optional[int]:
        """Write the entry `name` of `dir_fd` as `rel`; for a directory to descend into,
        return its fd (the caller closes it)."""
        st = fdtree.lstat_at(dir_fd, name)
        if st is None:
            return None  # gone meanwhile (a running container): moby skips it too
        is_dir = stat.S_ISDIR(st.st_mode)
        link = b""
        if stat.S_ISLNK(st.st_mode):
            try:
                link = os.fsencode(os.readlink(name, dir_fd=dir_fd))
            except FileNotFoundError:
                return None
            except OSError as e:  # EINVAL: no symlink any more
                raise DriverError(_replaced_under_us(rel)) from e
        cap = fdtree.xattr_at(dir_fd, name, tarformat.CAPABILITY_XATTR)
        h = tarformat.file_header(rel, st, link, cap)
        if h is None:
            log.debug("skipping %s: sockets cannot be stored in a tar", os.fsdecode(rel))
            return None
        if not is_dir and st.st_nlink > 1:
            first = self.seen.get(st.st_ino)
            if first is not None:
                h.typeflag, h.linkname, h.size = tarformat.LINK, first, 0
            else:
                self.seen[st.st_ino] = rel
        child_fd = None
        if is_dir and (descend or self.overlay):
            try:
                child_fd = fdtree.open_dir_at(dir_fd, name, os.fsdecode(rel))
            except FileNotFoundError:
                return None  # gone since its lstat
        try:
            extra = None
            if self.overlay:
                opaque = child_fd is not None and whiteouts.is_opaque(child_fd)
                h, extra = whiteouts.overlay_to_tar(h, st, opaque)
            if h.typeflag == tarformat.REG and h.size:
                self._add_file(dir_fd, name, st, h)
            else:
                self.stream.add(h)
            if extra is not None:
                self.stream.add(extra)
        except BaseException:
            if child_fd is not None:
                os.close(child_fd)
            raise
        if child_fd is not None and not descend:
            os.close(child_fd)
            child_fd = None
        return child_fd

    def _add_file(self, dir_fd: int, name: str, st: os.stat_result,
                  h: tarformat.Header) -> None:
        try:
            fd = os.open(name, fdtree.FILE_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                raise DriverError(_replaced_under_us(h.name)) from None
            raise
        try:
            now = os.fstat(fd)
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev) or not stat.S_ISREG(
                    now.st_mode):
                raise DriverError(_replaced_under_us(h.name))
            self.stream.add(h, fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.stream.close()


def _replaced_under_us(name: bytes) -> str:
    return (f"{os.fsdecode(name)!r} was replaced while the layer was being archived (a "
            "running container changed it); try again")


def _changed_under_us(where: str) -> str:
    return (f"{where!r} became a symlink or non-directory while the layer was being "
            "archived (a running container changed it); try again")


def write_layer_tar(out: IO[bytes], root: str) -> None:
    """The tar of a layer's diff dir, whiteouts turned back into markers: overlay2's
    native Diff, moby's TarWithOptions(root, OverlayWhiteoutFormat), byte for byte."""
    app = _Appender(out, overlay=True)
    root_fd = os.open(root, fdtree.DIR_FLAGS)
    try:
        with fdtree.DirStack(root_fd) as stack:
            pending: List[Tuple[bytes, Iterator[str]]] = [
                (b"", iter(fdtree.sorted_names(stack.fd)))]
            while pending:
                prefix, names = pending[-1]
                name = next(names, None)
                if name is None:
                    pending.pop()
                    if pending:
                        stack.pop()
                    continue
                rel = prefix + os.fsencode(name)
                try:
                    child = app.add(stack.fd, name, rel, descend=True)
                except UnsafeLayerError as e:
                    raise DriverError(_changed_under_us(os.fsdecode(rel))) from e
                if child is not None:
                    stack.push(name, child)
                    pending.append((rel + b"/", iter(fdtree.sorted_names(stack.fd))))
    finally:
        os.close(root_fd)
    app.close()


def export_changes(out: IO[bytes], root: str, changes: List[Change]) -> None:
    """The tar of the given changes, files read from `root`: moby's ExportChanges
    (overlay2's naive Diff). Deletions are markers stamped with the current time, as
    moby stamps them, so such a tar is never reproducible (nor is moby's)."""
    app = _Appender(out, overlay=False)
    root_fd = os.open(root, fdtree.DIR_FLAGS)
    try:
        with fdtree.DirStack(root_fd) as stack:
            for change in sorted(changes, key=lambda c: os.fsencode(c.path)):
                if change.kind == CHANGE_DELETE:
                    now = (time.time_ns() + 500_000_000) // 1_000_000_000  # Round(time.Second)
                    app.stream.add(whiteouts.deletion_header(change.path, now))
                    continue
                parts = change.path.strip("/").split("/")
                try:
                    fdtree.go_to(stack, parts[:-1], create=False, refuse=_changed_under_us)
                except FileNotFoundError:
                    continue  # the container changed under us; moby skips it too
                except UnsafeLayerError as e:
                    raise DriverError(str(e)) from None
                app.add(stack.fd, parts[-1], os.fsencode(change.path[1:]), descend=False)
    finally:
        os.close(root_fd)
    app.close()
