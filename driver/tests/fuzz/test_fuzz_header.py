"""Fuzzing tarread's header parser against tarfile's (issue 10): LayerTarInfo.frombuf
reads the headers layers hold without tarfile's per-field calls, and must read every
512-byte block exactly as tarfile.TarInfo.frombuf does - the same fields, or the same
error. Blocks are tarfile's own headers in each format, with hostile field values, then
byte-level mutations of them, and arbitrary bytes."""

from __future__ import annotations

import tarfile
from typing import Any, Tuple

from fuzzkit import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_graphdriver import tarread

FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname",
          "uname", "gname", "devmajor", "devminor")


def parsed(cls: Any, buf: bytes) -> Tuple[str, Any]:
    try:
        info = cls.frombuf(buf, "utf-8", "surrogateescape")
    except Exception as e:  # the kind of error is what must agree
        return "error", type(e)
    return "info", tuple(getattr(info, f) for f in FIELDS) + (
        getattr(info, "_sparse_structs", None),)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    info = tarfile.TarInfo(draw(st.sampled_from(
        ["a", "dir/", "d/e/f", "x" * 99, "y" * 150 + "/z", "é/ü", "./a", "a//b/"])))
    info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE,
                                      tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                      tarfile.FIFOTYPE, tarfile.CONTTYPE, b"Z"]))
    info.mode = draw(st.sampled_from([0o644, 0o7777, 0]))
    info.uid = draw(st.sampled_from([0, 1000, 2**21 - 1, 2**21, 2**40]))
    info.gid = draw(st.sampled_from([0, 65534, 2**31]))
    info.size = draw(st.sampled_from([0, 1, 511, 8**11 - 1, 8**11, 2**40]))
    info.mtime = draw(st.sampled_from([0, 1_600_000_000, 8**11, -1]))
    info.linkname = draw(st.sampled_from(["", "target", "t" * 100]))
    info.devmajor, info.devminor = draw(st.sampled_from([(0, 0), (8, 1), (2**21, 3)]))
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT]))
    try:
        buf = info.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:  # a value the format cannot hold
        buf = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return buf[-tarfile.BLOCKSIZE:] if draw(st.booleans()) else buf[:tarfile.BLOCKSIZE]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(headers()))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(buf) - 1))
        buf[pos] = draw(st.sampled_from([0, 0x20, 0x30, 0x37, 0x38, 0x80, 0xFF, 0x1C, 0x5F,
                                         ord("/"), ord("+"), ord("o")]))
    if draw(st.booleans()):  # a checksum that fits the mutation, so the fields are read
        buf[148:156] = b" " * 8
        buf[148:155] = b"%06o\0" % sum(buf) if sum(buf) < 8**6 else buf[148:155]
    return bytes(buf)


@settings(max_examples=examples(400))
@given(st.one_of(headers(), mutated(), st.binary(min_size=0, max_size=600),
                 st.just(bytes(512))))
def test_headers_read_as_tarfile_reads_them(buf: bytes) -> None:
    assert parsed(tarread.LayerTarInfo, buf) == parsed(tarfile.TarInfo, buf)
