"""Reading untrusted layer tars: Python's tarfile in stream mode, within bounds.

The daemon unpacks layer tars as root, made by whoever made the image. Python's tarfile
(mode "r|") trusts its input where that costs memory, disk or correctness; this module
closes each gap where tarfile would otherwise act (the hooks are TarInfo's header
methods, the same in Python 3.9 to 3.13):

- Special headers - PAX extended ('x', 'X') and global ('g') headers, GNU long names
  ('L') and long link names ('K'), the extension blocks of GNU sparse entries ('S') and
  the sparse map of PAX sparse 1.0 - are read whole into memory, and every header before
  an entry recurses once more. `LayerTarInfo` checks their declared size before a byte of
  them is read: MAX_SPECIAL_BYTES together and MAX_SPECIAL_HEADERS of them per entry.
- PAX records are read here, in linear time and framed as strictly as Go frames them:
  tarfile's regular expressions take quadratic time on Pythons without the fix of
  CVE-2024-6232, even within the bound.
- PAX global headers are skipped, as moby's Unpack skips them (Go's archive/tar returns
  them as entries of their own; tarfile would apply their records to every later entry).
- tarfile ends a stream quietly at an empty, short or corrupt header after the first
  one, so a truncated layer looked complete. Here the layer must end with the
  end-of-archive marker (`check_end`), and a header that cannot be parsed is an error.
- Sparse entries (GNU 'S', PAX sparse 0.0, 0.1 and 1.0) come out of tarfile as dense
  data, holes read as zeros: a 10 KiB tar could fill terabytes. `write_data` writes
  their data segments where they belong and leaves the holes holes.
- `SizeBudget`: the apparent size of a layer's files is limited (the configured
  max_layer_bytes, and the free space of the filesystem holding the layer).

Each refusal is a DriverError saying which entry (or where in the tar) and what is wrong.
"""

from __future__ import annotations

import os
import re
import tarfile
from typing import IO, Any, List, Optional, Tuple, Union

from . import tarformat
from .errors import DriverError

BLOCK = tarformat.BLOCK

# The special headers before one entry, their bodies together (block-rounded). Go's
# archive/tar, which reads layers for dockerd and overlay2, refuses any one of them larger
# than this (readSpecialFile, maxSpecialFileSize; tarformat's writer keeps to it too).
# 1 MiB holds thousands of xattrs, or some 50,000 segments of a sparse map.
MAX_SPECIAL_BYTES = tarformat.MAX_SPECIAL_FILE_SIZE
# The special headers before one entry (tarfile recurses once per header). Real writers
# put at most three there: a global header, then a PAX header, or a GNU long name and a
# GNU long link name.
MAX_SPECIAL_HEADERS = 8

# Header parse errors tarfile raises (Python 3.9-3.13; not in typeshed's stubs).
_EOF_HEADER = tarfile.EOFHeaderError  # type: ignore[attr-defined]  # a zero block
_EMPTY_HEADER = tarfile.EmptyHeaderError  # type: ignore[attr-defined]  # no bytes at all
_SHORT_HEADER = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]  # < 512 bytes
_BAD_HEADER = tarfile.InvalidHeaderError  # type: ignore[attr-defined]  # checksum, fields
_SUBSEQUENT_HEADER = tarfile.SubsequentHeaderError  # type: ignore[attr-defined]
_nti = tarfile.nti  # type: ignore[attr-defined]  # a numeric header field, as tarfile reads it

_DECIMAL = re.compile(rb"[0-9]{1,19}")  # a number of a sparse map (int64, as Go reads it)
_INT64_MAX = (1 << 63) - 1


def _blocks(n: int) -> int:
    """`n` bytes rounded up to whole tar blocks."""
    return -(-n // BLOCK) * BLOCK


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n} bytes ({n / (1 << shift):.1f} {unit})"
    return f"{n} bytes"


# ---------------------------------------------------------------------------- headers


class _Chain:
    """What precedes the entry being read: its special headers, the entry before it."""

    def __init__(self) -> None:
        self.depth = 0  # LayerTarInfo.fromtarfile calls in progress (one per header)
        self.start = 0  # offset of the entry's first header
        self.headers = 0
        self.bytes = 0
        self.after: Optional[str] = None  # name of the previous entry
        self.ended = False  # the stream ended with a zero block

    def where(self) -> str:
        """Where the entry being read starts, for messages."""
        at = f"at offset {self.start}"
        return f"{at} (after entry {self.after!r})" if self.after is not None else at

    def special(self, what: str, size: int, *, header: bool = True) -> None:
        """Account for `size` bytes of `what` before reading them, or refuse."""
        if header:
            self.headers += 1
            if self.headers > MAX_SPECIAL_HEADERS:
                raise DriverError(
                    f"layer tar header {self.where()}: more than {MAX_SPECIAL_HEADERS} "
                    "special headers (PAX, GNU long name) before one entry; refusing the layer")
        if size < 0:
            raise DriverError(f"layer tar header {self.where()}: {what} has a negative size")
        self.bytes += _blocks(size)
        if self.bytes > MAX_SPECIAL_BYTES:
            raise DriverError(
                f"layer tar header {self.where()}: {what} of {_size(size)} takes the "
                f"special headers of one entry beyond {_size(MAX_SPECIAL_BYTES)}; "
                "refusing the layer")


def _chain(tar: Any) -> _Chain:
    chain = getattr(tar, "chain", None)
    if not isinstance(chain, _Chain):
        raise TypeError("LayerTarInfo reads only through LayerTarFile")
    return chain


def _read_block(tar: Any, what: str) -> bytes:
    buf: bytes = tar.fileobj.read(BLOCK)
    if len(buf) != BLOCK:
        raise DriverError(f"layer tar header {_chain(tar).where()}: the layer tar ends inside "
                          f"{what}: it is truncated")
    return buf


class LayerTarInfo(tarfile.TarInfo):
    """tarfile.TarInfo whose special headers are bounded before they are read.

    The methods below are tarfile's hooks (TarInfo.fromtarfile and the _proc_* methods
    TarInfo._proc_member calls for each kind of header); tarfile calls them with the
    TarFile as their last argument.
    """

    @classmethod
    def fromtarfile(cls, tar: Any) -> LayerTarInfo:
        chain = _chain(tar)
        if chain.depth == 0:  # the first header of an entry
            chain.start, chain.headers, chain.bytes = tar.fileobj.tell(), 0, 0
        chain.depth += 1
        try:
            return super().fromtarfile(tar)
        except _EOF_HEADER:
            if chain.depth == 1:
                chain.ended = True
            raise
        except (_EMPTY_HEADER, _SHORT_HEADER, _BAD_HEADER) as e:
            if chain.depth > 1:
                raise  # the header after a special header: tarfile reports it
            raise _header_error(chain, e) from None
        finally:
            chain.depth -= 1

    @classmethod
    def frombuf(cls, buf: Union[bytes, bytearray], encoding: str, errors: str) -> Any:
        """tarfile.TarInfo.frombuf at a fraction of its cost, for the headers layers hold:
        the checksum summed in one pass, the fields read without a call per field. A
        header it does not take as it is (base-256 numbers, a checksum of signed bytes,
        GNU sparse, anything malformed) goes to tarfile's own, which decides."""
        if len(buf) != BLOCK or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        try:
            chksum = _octal(buf[148:156])
            if chksum != 256 + sum(buf) - sum(buf[148:156]) or not buf.strip(b"\0"):
                raise ValueError("checksum, or the end-of-archive block")
            obj = cls()
            obj.mode = _octal(buf[100:108])
            obj.uid = _octal(buf[108:116])
            obj.gid = _octal(buf[116:124])
            obj.size = _octal(buf[124:136])
            obj.mtime = _octal(buf[136:148])
            obj.devmajor = _octal(buf[329:337])
            obj.devminor = _octal(buf[337:345])
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        obj.chksum = chksum
        obj.type = bytes(buf[156:157])
        obj.name = _text(buf[0:100], encoding, errors)
        obj.linkname = _text(buf[157:257], encoding, errors)
        obj.uname = _text(buf[265:297], encoding, errors)
        obj.gname = _text(buf[297:329], encoding, errors)
        prefix = _text(buf[345:500], encoding, errors)
        if obj.type == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE  # V7's directories
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + obj.name
        return obj

    def _proc_pax(self, tar: Any) -> Any:
        """A PAX header ('x', 'X'; 'g' is skipped): tarfile's own, but its records read
        by `_pax_records` - tarfile's regular expressions take quadratic time on
        Pythons without the fix of CVE-2024-6232 (3.11.7: 13 s for 64 KiB of digits)."""
        chain = _chain(tar)
        what = "a PAX global header" if self.type == tarfile.XGLTYPE else \
            "a PAX extended header"
        chain.special(what, self.size)
        buf = tar.fileobj.read(_blocks(self.size))
        if len(buf) != _blocks(self.size):
            raise DriverError(f"layer tar header {chain.where()}: the layer tar ends inside "
                              f"{what}: it is truncated")
        if self.type == tarfile.XGLTYPE:
            return self.fromtarfile(tar)  # as if it were not there: moby ignores them
        try:
            records = _pax_records(buf[:self.size])
        except ValueError as e:
            raise DriverError(f"layer tar header {chain.where()}: a malformed PAX extended "
                              f"header: {e}") from None
        binary = any(k == b"hdrcharset" and v == b"BINARY" for k, v in records)
        pax_headers = dict(tar.pax_headers)  # the global records: none (they are skipped)
        for key, value in records:
            name = self._decode_pax_field(key, "utf-8", "utf-8", tar.errors)  # type: ignore[attr-defined]
            pax_headers[name] = self._decode_pax_field(  # type: ignore[attr-defined]
                value, tar.encoding if binary and name in tarfile.PAX_NAME_FIELDS else "utf-8",
                tar.encoding if name in tarfile.PAX_NAME_FIELDS else "utf-8", tar.errors)
        try:
            member: Any = self.fromtarfile(tar)
        except tarfile.HeaderError as e:
            raise _SUBSEQUENT_HEADER(str(e)) from None
        try:
            if "GNU.sparse.map" in pax_headers:  # GNU's PAX sparse format 0.1
                self._proc_gnusparse_01(member, pax_headers)
            elif "GNU.sparse.size" in pax_headers:  # 0.0: the map in repeated records
                member.sparse = _sparse_00(records)
            elif (pax_headers.get("GNU.sparse.major"), pax_headers.get("GNU.sparse.minor")) \
                    == ("1", "0"):  # 1.0: the map at the start of the data
                self._proc_gnusparse_10(member, pax_headers, tar)
            blocks = pax_headers.get("GNU.sparse.numblocks")
            if blocks is not None and member.sparse is not None and \
                    _map_number(blocks.encode()) != len(member.sparse):
                raise _BAD_HEADER(f"GNU.sparse.numblocks={blocks} but the map has "
                                  f"{len(member.sparse)} segments")
        except _BAD_HEADER as e:
            raise DriverError(f"layer tar header {chain.where()}: a malformed PAX extended "
                              f"header: {e}") from None
        member._apply_pax_info(pax_headers, tar.encoding, tar.errors)  # type: ignore[attr-defined]
        member.offset = self.offset
        if "size" in pax_headers:  # the next header is where this size says
            tar.offset = member.offset_data + (
                _blocks(member.size) if member.isreg() or member.type not in
                tarfile.SUPPORTED_TYPES else 0)
        return member

    def _proc_gnulong(self, tar: Any) -> Any:
        _chain(tar).special("a GNU long name" if self.type == tarfile.GNUTYPE_LONGNAME
                            else "a GNU long link name", self.size)
        return super()._proc_gnulong(tar)  # type: ignore[misc]

    def _proc_sparse(self, tar: Any) -> Any:
        """A GNU sparse entry ('S'): tarfile's own, with its extension blocks bounded and
        a short one an error (tarfile reads them until one says it is the last)."""
        chain = _chain(tar)
        what = "the extension blocks of a GNU sparse entry"
        structs, extended, realsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while extended:
            chain.special(what, BLOCK, header=False)
            buf = _read_block(tar, what)
            for pos in range(0, 21 * 24, 24):
                try:
                    offset, numbytes = _nti(buf[pos:pos + 12]), _nti(buf[pos + 12:pos + 24])
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            extended = bool(buf[504])
        self.sparse = structs  # type: ignore[assignment]
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + _blocks(self.size)
        self.size = realsize
        return self

    def _proc_gnusparse_01(self, member: Any, pax_headers: Any) -> None:
        """PAX sparse 0.1: the map is a PAX record (bounded with its header)."""
        numbers = [_map_number(x.encode()) for x in pax_headers["GNU.sparse.map"].split(",")]
        if len(numbers) % 2:
            raise _BAD_HEADER("the sparse map (GNU.sparse.map) has an odd count of numbers")
        member.sparse = list(zip(numbers[::2], numbers[1::2]))

    def _proc_gnusparse_10(self, member: Any, pax_headers: Any, tar: Any) -> None:
        """PAX sparse 1.0: the map is at the start of the entry's data, in decimal lines
        (its count of segments first), padded to whole blocks; bounded here."""
        chain = _chain(tar)
        what = "the sparse map (PAX sparse 1.0) of an entry"
        numbers: List[int] = []
        count: Optional[int] = None
        pending = b""
        while count is None or len(numbers) < 2 * count:
            line, nl, rest = pending.partition(b"\n")
            if not nl:
                if len(pending) > 19:  # no number of a map is that long
                    raise _BAD_HEADER(f"{what} is malformed")
                chain.special(what, BLOCK, header=False)
                pending += _read_block(tar, what)
                continue
            pending = rest
            if count is None:
                count = _map_number(line)
            else:
                numbers.append(_map_number(line))
        member.offset_data = tar.fileobj.tell()
        member.sparse = list(zip(numbers[::2], numbers[1::2]))


def _octal(field: Union[bytes, bytearray]) -> int:
    """A number field in octal digits, as tarfile's nti reads it (ValueError for anything
    else: a base-256 number, a field tarfile's own code is to judge)."""
    end = field.find(0)
    return int((field if end < 0 else field[:end]).strip() or b"0", 8)


def _text(field: Union[bytes, bytearray], encoding: str, errors: str) -> str:
    """A text field up to its first NUL, as tarfile's nts reads it."""
    end = field.find(0)
    return (field if end < 0 else field[:end]).decode(encoding, errors)


def _header_error(chain: _Chain, e: Exception) -> DriverError:
    """What tarfile's header error `e` for an entry's first header means for a layer."""
    first = chain.after is None and chain.start == 0
    if isinstance(e, _EMPTY_HEADER):
        if first:
            return DriverError("layer data is empty: not even the end-of-archive blocks of "
                               "an empty tar")
        return DriverError(f"the layer tar stops {chain.where()} without the end-of-archive "
                           "marker (zero blocks): it is truncated")
    if isinstance(e, _SHORT_HEADER):
        return DriverError(f"the layer tar ends inside the header {chain.where()}: it is "
                           "truncated")
    if first:
        return DriverError(f"layer data is not a valid uncompressed tar: {e}")
    return DriverError(f"the layer tar has a corrupt header {chain.where()}: {e}; it is "
                       "damaged or truncated")


def _sparse_00(records: List[Tuple[bytes, bytes]]) -> List[Tuple[int, int]]:
    """GNU's PAX sparse format 0.0: GNU.sparse.offset and GNU.sparse.numbytes records,
    alternating (as Go requires; tarfile paired them up in any order)."""
    numbers: List[int] = []
    for key, value in records:
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            if key != (b"GNU.sparse.offset", b"GNU.sparse.numbytes")[len(numbers) % 2]:
                raise _BAD_HEADER("GNU.sparse.offset and GNU.sparse.numbytes do not alternate")
            numbers.append(_map_number(value))
    if len(numbers) % 2:
        raise _BAD_HEADER("the sparse map has an offset without its length")
    return list(zip(numbers[::2], numbers[1::2]))


def _map_number(text: bytes) -> int:
    if not _DECIMAL.fullmatch(text) or int(text) > _INT64_MAX:
        raise _BAD_HEADER(f"the sparse map holds {text[:40]!r}, not a number")
    return int(text)


def _pax_records(buf: bytes) -> List[Tuple[bytes, bytes]]:
    """The records "<length> <key>=<value>\\n" of a PAX header, in linear time and as
    strictly as Go's parsePAX frames them: every byte of the header in a record, keys not
    empty. (A NUL byte in a name or an xattr name, which Go refuses here, is refused where
    the entry is known and can be named: archive.split_member_name, _check_member.)"""
    records = []
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + 21)  # the length: at most 20 digits
        digits = buf[pos:space]
        if space < 0 or not digits.isdigit():
            raise ValueError(f"no record length at byte {pos}")
        end = pos + int(digits)
        if end > len(buf) or end <= space + 2 or buf[end - 1:end] != b"\n":
            raise ValueError(f"record at byte {pos} has a wrong length ({int(digits)})")
        key, eq, value = buf[space + 1:end - 1].partition(b"=")
        if not key or not eq:
            raise ValueError(f"record at byte {pos} is not key=value")
        records.append((key, value))
        pos = end
    return records


class LayerTarFile(tarfile.TarFile):
    """A tarfile.TarFile reading a layer (open with `open_layer`)."""

    tarinfo = LayerTarInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.chain = _Chain()
        super().__init__(*args, **kwargs)

    def next(self) -> Optional[tarfile.TarInfo]:
        try:
            member = super().next()
        except (ValueError, IndexError, OverflowError) as e:
            # A field tarfile cannot convert (e.g. GNU.sparse.realsize=x): not a 500.
            raise DriverError(f"the layer tar has a malformed header {self.chain.where()}: "
                              f"{e}") from None
        # In stream mode tarfile keeps every member it read (for lookups by name, which
        # a stream cannot serve): a layer's worth of them, with their PAX records.
        self.members.clear()  # type: ignore[attr-defined]
        if member is not None:
            self.chain.after = member.name
        return member


class ForwardReader:
    """A layer stream as tarfile reads it: `read`, `tell`, and `seek` forward (backward
    only within what is still buffered), in one pass over the stream.

    tarfile's own stream reader (mode "r|") keeps its buffer as one bytes object and
    copies the rest of it at every read: a 512-byte header read cost a copy of up to
    the whole buffer, a third of the time of applying a layer of small files. Here a read
    copies only what it returns, and reads of a buffer's size or more go to the stream
    directly.
    """

    def __init__(self, raw: IO[bytes], bufsize: int) -> None:
        self._raw = raw
        self._bufsize = bufsize
        self._buf = b""
        self._at = 0  # the unread part is self._buf[self._at:]
        self._pos = 0  # the stream offset of self._buf[self._at]

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        want = (1 << 62) if n is None or n < 0 else n
        parts: List[bytes] = []
        while want:
            have = len(self._buf) - self._at
            if not have:
                if want >= self._bufsize:
                    data = self._raw.read(want if n >= 0 else self._bufsize)
                    if not data:
                        break
                    parts.append(data)
                else:
                    self._buf, self._at = self._raw.read(self._bufsize), 0
                    if not self._buf:
                        break
                    continue
            else:
                data = self._buf[self._at:self._at + want]
                self._at += len(data)
                parts.append(data)
            want -= len(data)
            self._pos += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise OSError("a layer stream can only be sought from its start or from here")
        if pos < self._pos - self._at:
            raise OSError(f"cannot seek back to {pos} in a layer stream (at {self._pos})")
        if pos < self._pos:
            self._at -= self._pos - pos
            self._pos = pos
        while pos > self._pos:
            if not self.read(min(pos - self._pos, self._bufsize)):
                break  # the stream ends before pos: the next read finds nothing
        return self._pos


def open_layer(stream: IO[bytes], bufsize: int) -> LayerTarFile:
    """Open an uncompressed layer tar for reading in one pass."""
    return LayerTarFile(fileobj=ForwardReader(stream, bufsize),  # type: ignore[arg-type]
                        mode="r", errors="surrogateescape")


def check_end(tar: LayerTarFile) -> None:
    """The entries are read: the layer must end with the end-of-archive marker.

    Go's archive/tar (what dockerd and overlay2 read layers with) ends at two zero
    blocks, at one zero block followed by the end of the stream, and also at a stream
    that simply stops at an entry boundary; a zero block followed by anything but a zero
    block is an error (ErrHeader). Docker writes two zero blocks (tar.Writer.Close), and so
    do GNU tar, Python's tarfile and tarformat. Here at least one zero block is required -
    a stream that stops at an entry boundary without one is a truncated layer, not a
    complete one - and what follows it must be nothing or a second zero block (anything
    after those is ignored, as Go ignores it).
    """
    chain = tar.chain
    if not chain.ended:
        raise DriverError(f"the layer tar stops {chain.where()} without the end-of-archive "
                          "marker: it is truncated")
    second = tar.fileobj.read(BLOCK)
    if second.count(0) != len(second):
        raise DriverError(f"the layer tar has a zero block {chain.where()} followed by more "
                          "data, not by a second zero block: it is damaged")
    if 0 < len(second) < BLOCK:
        raise DriverError(f"the layer tar ends inside its end-of-archive marker "
                          f"{chain.where()}: it is truncated")


# ---------------------------------------------------------------------------- data


def _segments(tar: LayerTarFile, member: tarfile.TarInfo, shown: str) -> List[Tuple[int, int]]:
    """(offset, length) of the data stored for a regular entry, checked as Go checks a
    sparse map (validateSparseEntries): in order, not overlapping, within the size, and
    exactly the data stored in the tar."""
    if member.size < 0:
        raise DriverError(f"tar entry {shown!r} has a negative size ({member.size})")
    sparse = getattr(member, "sparse", None)
    if sparse is None:
        return [(0, member.size)]
    for key in ("GNU.sparse.realsize", "GNU.sparse.size"):
        raw = member.pax_headers.get(key)
        if raw is not None and raw != str(member.size):
            raise DriverError(f"tar entry {shown!r}: its sparse size {key}={raw!r} is not its "
                              f"size {member.size} (conflicting PAX records)")
    out: List[Tuple[int, int]] = []
    end = 0
    for offset, length in sparse:
        if length == 0:
            continue  # GNU tar ends a map with (size, 0); empty slots of 'S' headers are (0, 0)
        if offset < end or length < 0 or offset + length > member.size:
            raise DriverError(
                f"tar entry {shown!r}: its sparse map is invalid (segment of {length} bytes at "
                f"{offset}: overlapping, out of order or beyond its size of {member.size})")
        out.append((offset, length))
        end = offset + length
    stored = sum(length for _, length in out)
    if _blocks(stored) != tar.offset - member.offset_data:
        raise DriverError(f"tar entry {shown!r}: its sparse map names {stored} bytes of data, "
                          f"but the tar stores {tar.offset - member.offset_data} (rounded "
                          "to blocks)")
    return out


def write_data(tar: LayerTarFile, member: tarfile.TarInfo, fd: int, shown: str,
               chunk: int) -> None:
    """Copy a regular entry's data from the tar into the new file `fd`.

    A sparse entry's segments are written at their offsets and the file is cut to its
    size: its holes stay holes (reading them gives the zeros a dense copy would hold).
    """
    segments = _segments(tar, member, shown)
    src = tar.fileobj
    if src.tell() != member.offset_data:
        src.seek(member.offset_data)
    total = sum(length for _, length in segments)
    done = 0
    sparse = getattr(member, "sparse", None) is not None
    for offset, length in segments:
        if sparse:
            os.lseek(fd, offset, os.SEEK_SET)
        while length:
            data = src.read(min(length, chunk))
            if not data:
                raise DriverError(f"tar entry {shown!r}: the layer tar ends inside its data "
                                  f"({total - done} of {total} bytes missing): it is truncated")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            length -= len(data)
            done += len(data)
    if sparse:
        os.ftruncate(fd, member.size)
    padding = tar.offset - src.tell()
    if padding > 0 and len(src.read(padding)) != padding:
        raise DriverError(f"tar entry {shown!r}: the layer tar ends inside the padding after "
                          "its data: it is truncated")


# ---------------------------------------------------------------------------- size


class SizeBudget:
    """How many bytes a layer's regular files may take, counted by their sizes: a sparse
    file counts its whole size, as the layer's Diff (moby's tar format) writes it densely.

    The limit is `max_bytes` when set, and never more than what is free (for root's use
    of it, f_bavail: the filesystem's reserve stays untouched) on the filesystem holding
    `root_fd` when the layer's extraction begins.
    """

    def __init__(self, root_fd: int, max_bytes: int) -> None:
        st = os.fstatvfs(root_fd)
        # f_blocks 0: the filesystem does not report its size (some FUSE ones).
        self.free: Optional[int] = st.f_bavail * st.f_frsize if st.f_blocks else None
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int, shown: str) -> None:
        """Count entry `shown`'s `size` bytes before they are written, or refuse them."""
        total = self.used + size
        if self.max_bytes and total > self.max_bytes:
            raise DriverError(
                f"tar entry {shown!r} ({_size(size)}) takes the layer to {_size(total)}, "
                f"beyond the limit max_layer_bytes = {self.max_bytes} of this driver's "
                "configuration")
        if self.free is not None and total > self.free:
            raise DriverError(
                f"tar entry {shown!r} ({_size(size)}) takes the layer to {_size(total)}, "
                f"beyond the free space of the filesystem holding it ({_size(self.free)} "
                "free when the layer began)")
        self.used = total
