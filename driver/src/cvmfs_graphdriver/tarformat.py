"""Layer tars written byte for byte as moby writes them.

dockerd hashes the tar a driver's `Diff` streams into the layer's diff ID. For a layer
committed on our driver to have the same diff ID as the same layer committed on
overlay2 (so registries and caches deduplicate them), our tar must be exactly what
moby's `archive.TarWithOptions` produces: Go's `archive/tar` writer fed with headers
from moby's `archive.FileInfoHeader`. This module is a port of both:

- `file_header`: moby's FileInfoHeader + ReadSecurityXattrToTarHeader (moby 20.10,
  pkg/archive/archive.go): the whole st_mode (file-type bits included, as
  `fillGo18FileTypeBits` puts them back), mtime truncated to the second, no atime or
  ctime, user and group names looked up on this host (Go's `statUnix`), canonical names
  (directories end in "/"), only `security.capability` among the xattrs (a v3
  capability rewritten as v2).
- `encode`: Go 1.19's `tar.Writer.WriteHeader` (archive/tar/writer.go, common.go
  `allowedFormats`): USTAR whenever every field fits it (long ASCII names split into
  prefix and name), PAX otherwise with only the records needed, sorted, in an extended
  header named `<dir>/PaxHeaders.0/<base>`; numbers in octal, fields that do not fit
  written as 0 beside their PAX record.
- `TarStream`: entries padded to 512 bytes, closed by two zero blocks and nothing
  more (Python's tarfile would pad the archive to a 10 KiB record).

Names and values are bytes here (Go strings are bytes; file names may not be UTF-8).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from dataclasses import dataclass, field
from typing import IO, Callable, Dict, Optional, Tuple

BLOCK = 512
NAME_SIZE = 100
PREFIX_SIZE = 155
MAX_SPECIAL_FILE_SIZE = 1 << 20  # Go refuses larger PAX headers

# Type flags (archive/tar).
REG, LINK, SYMLINK, CHAR, BLOCK_DEV, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
XHEADER = b"x"
_HEADER_ONLY = {LINK, SYMLINK, CHAR, BLOCK_DEV, DIR, FIFO}

CAPABILITY_XATTR = "security.capability"
PAX_XATTR = "SCHILY.xattr."  # PAX record key prefix of an xattr
_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3, _XATTR_CAPS_SZ_2 = 2, 3, 20

USTAR, PAX = "ustar", "pax"


@dataclass
class Header:
    """The fields of a tar header that moby sets (Go's tar.Header, trimmed)."""

    name: bytes
    typeflag: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0  # whole seconds since the epoch (moby truncates; may be < 0)
    linkname: bytes = b""
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Dict[bytes, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------- names


class NameLookup:
    """uid/gid -> user/group name on this host, cached as Go's statUnix caches them
    (only successful lookups are remembered)."""

    def __init__(self) -> None:
        self._users: Dict[int, bytes] = {}
        self._groups: Dict[int, bytes] = {}

    def user(self, uid: int) -> bytes:
        name = self._users.get(uid)
        if name is None:
            try:
                name = os.fsencode(pwd.getpwuid(uid).pw_name)
            except (KeyError, OverflowError):
                return b""
            self._users[uid] = name
        return name

    def group(self, gid: int) -> bytes:
        name = self._groups.get(gid)
        if name is None:
            try:
                name = os.fsencode(grp.getgrgid(gid).gr_name)
            except (KeyError, OverflowError):
                return b""
            self._groups[gid] = name
        return name


NAMES = NameLookup()


def _type_of(mode: int) -> Optional[bytes]:
    if stat.S_ISREG(mode):
        return REG
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return SYMLINK
    if stat.S_ISCHR(mode):
        return CHAR
    if stat.S_ISBLK(mode):
        return BLOCK_DEV
    if stat.S_ISFIFO(mode):
        return FIFO
    return None  # sockets (and anything else) cannot be stored in a tar


def capability(raw: Optional[bytes]) -> Optional[bytes]:
    """A security.capability value as moby stores it: v3 (namespaced root uid) as v2."""
    if raw is None:
        return None
    if len(raw) > 3 and raw[3] == _VFS_CAP_REVISION_3:
        return raw[:3] + bytes([_VFS_CAP_REVISION_2]) + raw[4:_XATTR_CAPS_SZ_2]
    return raw


def file_header(name: bytes, st: os.stat_result, link: bytes = b"",
                cap: Optional[bytes] = None, names: NameLookup = NAMES) -> Optional[Header]:
    """moby's FileInfoHeader for an lstat result (None for a socket: moby skips those).

    `name` is the path relative to the archive root, `link` a symlink's target, `cap`
    the raw security.capability xattr if the file has one.
    """
    typeflag = _type_of(st.st_mode)
    if typeflag is None:
        return None
    if typeflag == DIR and not name.endswith(b"/"):
        name += b"/"
    h = Header(
        name=name,
        typeflag=typeflag,
        mode=st.st_mode,  # permissions, setuid/setgid/sticky and the file-type bits
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if typeflag == REG else 0,
        mtime=st.st_mtime_ns // 1_000_000_000,  # Truncate(time.Second)
        linkname=link if typeflag == SYMLINK else b"",
        uname=names.user(st.st_uid),
        gname=names.group(st.st_gid),
    )
    if typeflag in (CHAR, BLOCK_DEV):
        h.devmajor, h.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    value = capability(cap)
    if value is not None:
        h.xattrs[CAPABILITY_XATTR.encode()] = value
    return h


# ---------------------------------------------------------------------------- encoding


class HeaderError(ValueError):
    """A header no tar format can hold (Go's WriteHeader refuses it too)."""


def _fits_octal(size: int, x: int) -> bool:
    return x >= 0 and (size >= 22 or x < 1 << ((size - 1) * 3))


def _is_ascii(s: bytes) -> bool:
    return s.isascii()


def _to_ascii(s: bytes) -> bytes:
    # Go drops every rune >= 0x80 (and NUL); at the byte level, every byte >= 0x80.
    return s if s.isascii() and b"\x00" not in s else bytes(
        c for c in s if 0 < c < 0x80)


def split_ustar_path(name: bytes) -> Optional[Tuple[bytes, bytes]]:
    """Go's splitUSTARPath: (prefix, name) for a long ASCII path, or None."""
    length = len(name)
    if length <= NAME_SIZE or not _is_ascii(name):
        return None
    if length > PREFIX_SIZE + 1:
        length = PREFIX_SIZE + 1
    elif name[length - 1:length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen = len(name) - i - 1
    if i <= 0 or nlen > NAME_SIZE or nlen == 0 or i > PREFIX_SIZE:
        return None
    return name[:i], name[i + 1:]


def _put_string(blk: bytearray, off: int, size: int, s: bytes) -> None:
    """Go's formatter.formatString: copy what fits, NUL-terminate if shorter; a value
    cut at a '/' loses its trailing slashes (some readers take them for directories)."""
    blk[off:off + min(len(s), size)] = s[:size]
    if len(s) < size:
        blk[off + len(s)] = 0
    if len(s) > size and s[size - 1:size] == b"/":
        n = len(s[:size].rstrip(b"/"))
        blk[off + n] = 0


def _put_octal(blk: bytearray, off: int, size: int, x: int) -> None:
    """Go's formatter.formatOctal: zero-padded octal and a NUL; 0 if it does not fit."""
    if not _fits_octal(size, x):
        x = 0
    s = b"%o" % x
    if size - len(s) - 1 > 0:
        s = b"0" * (size - len(s) - 1) + s
    _put_string(blk, off, size, s)


def _finish(blk: bytearray) -> bytes:
    """Magic "ustar\\0" + "00" (USTAR and PAX alike), then the checksum."""
    blk[257:263] = b"ustar\x00"
    blk[263:265] = b"00"
    blk[148:156] = b" " * 8
    _put_octal(blk, 148, 7, sum(blk))
    blk[155] = 0x20
    return bytes(blk)


def _v7_plus(h: Header, name: bytes, to_str: Callable[[bytes], bytes]) -> bytearray:
    """Go's templateV7Plus: the fields every format shares."""
    blk = bytearray(BLOCK)
    blk[156:157] = h.typeflag
    _put_string(blk, 0, 100, to_str(name))
    _put_string(blk, 157, 100, to_str(h.linkname))
    _put_octal(blk, 100, 8, h.mode)
    _put_octal(blk, 108, 8, h.uid)
    _put_octal(blk, 116, 8, h.gid)
    _put_octal(blk, 124, 12, h.size)
    _put_octal(blk, 136, 12, h.mtime)
    _put_string(blk, 265, 32, to_str(h.uname))
    _put_string(blk, 297, 32, to_str(h.gname))
    _put_octal(blk, 329, 8, h.devmajor)
    _put_octal(blk, 337, 8, h.devminor)
    return blk


def _pax_record(key: bytes, value: bytes) -> bytes:
    """"<len> key=value\\n", where <len> counts itself (Go's formatPAXRecord)."""
    size = len(key) + len(value) + 3
    size += len(str(size))
    record = b"%d %s=%s\n" % (size, key, value)
    if len(record) != size:
        size = len(record)
        record = b"%d %s=%s\n" % (size, key, value)
    return record


def _allowed(h: Header) -> Tuple[str, Dict[bytes, bytes]]:
    """Go's Header.allowedFormats, for the fields moby sets: the format to write
    (USTAR if it can hold everything, else PAX) and the PAX records PAX would need."""
    ustar, pax = True, True
    records: Dict[bytes, bytes] = {}

    def string(s: bytes, size: int, key: Optional[bytes]) -> None:
        nonlocal ustar, pax
        if not _is_ascii(s) or len(s) > size:
            if key != b"path" or split_ustar_path(s) is None:
                ustar = False
            if key is None:
                pax = False
            else:
                records[key] = s

    def number(n: int, size: int, key: Optional[bytes]) -> None:
        nonlocal ustar, pax
        if not _fits_octal(size, n):
            ustar = False
            if key is None:
                pax = False
            else:
                records[key] = b"%d" % n

    string(h.name, 100, b"path")
    string(h.linkname, 100, b"linkpath")
    string(h.uname, 32, b"uname")
    string(h.gname, 32, b"gname")
    number(h.mode, 8, None)
    number(h.uid, 8, b"uid")
    number(h.gid, 8, b"gid")
    number(h.size, 12, b"size")
    number(h.devmajor, 8, None)
    number(h.devminor, 8, None)
    # mtime is whole seconds here (moby truncates it), so it needs a PAX record only when
    # it does not fit 11 octal digits: before 1970 or after 2242.
    if not _fits_octal(12, h.mtime):
        ustar = False
        records[b"mtime"] = b"%d" % h.mtime
    if h.typeflag in (REG, CHAR, BLOCK_DEV, FIFO) and h.name.endswith(b"/"):
        raise HeaderError(f"tar entry {h.name!r}: filename may not have trailing slash")
    if h.xattrs:
        for k, v in h.xattrs.items():
            records[PAX_XATTR.encode() + k] = v
        ustar = False
    for k, v in records.items():
        if not k or b"=" in k or (b"\x00" in v if k in (b"path", b"linkpath", b"uname",
                                                       b"gname") else b"\x00" in k):
            raise HeaderError(f"tar entry {h.name!r}: invalid PAX record {k!r}")
    if ustar:
        return USTAR, {}
    if pax:
        return PAX, records
    raise HeaderError(f"tar entry {h.name!r}: no tar format can encode this header")


def _pax_header_name(name: bytes) -> bytes:
    """path.Join(dir, "PaxHeaders.0", file) of path.Split(name), as writeRawFile
    shortens it: ASCII only, at most 100 bytes, no trailing slash."""
    head, _, base = name.rpartition(b"/")
    parts = [p for p in head.split(b"/") if p] + [b"PaxHeaders.0"] + ([base] if base else [])
    joined = (b"/" if name.startswith(b"/") else b"") + b"/".join(parts)
    return _to_ascii(joined)[:NAME_SIZE].rstrip(b"/")


def encode(h: Header) -> bytes:
    """The header block(s) Go's tar.Writer.WriteHeader writes for `h` (data not included)."""
    fmt, records = _allowed(h)
    if fmt == USTAR:
        name, prefix = h.name, b""
        split = split_ustar_path(h.name)
        if split is not None:
            prefix, name = split
        blk = _v7_plus(h, name, lambda s: s)
        _put_string(blk, 345, PREFIX_SIZE, prefix)
        return _finish(blk)
    out = b""
    if records:
        data = b"".join(_pax_record(k, records[k]) for k in sorted(records))
        if len(data) > MAX_SPECIAL_FILE_SIZE:
            raise HeaderError(f"tar entry {h.name!r}: PAX header larger than 1 MiB")
        ext = bytearray(BLOCK)
        ext[156:157] = XHEADER
        _put_string(ext, 0, 100, _pax_header_name(h.name))
        _put_octal(ext, 100, 8, 0)
        _put_octal(ext, 108, 8, 0)
        _put_octal(ext, 116, 8, 0)
        _put_octal(ext, 124, 12, len(data))
        _put_octal(ext, 136, 12, 0)
        out = _finish(ext) + data + b"\x00" * _padding(len(data))
    return out + _finish(_v7_plus(h, h.name, _to_ascii))


def _padding(size: int) -> int:
    return -size % BLOCK


def data_size(h: Header) -> int:
    """Bytes of data that follow the header in the archive."""
    return 0 if h.typeflag in _HEADER_ONLY else h.size


# ---------------------------------------------------------------------------- stream


class TarStream:
    """Writes entries to `out` as Go's tar.Writer does; `close()` ends the archive."""

    def __init__(self, out: IO[bytes], chunk: int = 1 << 20) -> None:
        self._out = out
        self._chunk = chunk

    def add(self, h: Header, fd: Optional[int] = None) -> None:
        """Write `h`, then its data read from `fd` (regular files with a size)."""
        self._out.write(encode(h))
        size = data_size(h)
        if not size:
            return
        if fd is None:
            raise ValueError(f"tar entry {h.name!r} needs its data")
        left = size
        while left:
            chunk = os.read(fd, min(self._chunk, left))
            if not chunk:
                raise OSError(errno.EIO, f"{os.fsdecode(h.name)} shrank while being archived "
                              f"({left} of {size} bytes missing)")
            self._out.write(chunk)
            left -= len(chunk)
        pad = _padding(size)
        if pad:
            self._out.write(b"\x00" * pad)

    def close(self) -> None:
        self._out.write(b"\x00" * (2 * BLOCK))
