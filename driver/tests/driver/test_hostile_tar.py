"""Hostile and damaged layer tars on the input path (issue 11, findings 3, 4, 5 and 7).

Sparse entries are written with their holes, and a layer takes no more than its limit
or the free space (3); special headers are bounded before they are read (4); a layer
that is not complete - no end-of-archive marker, a short body, a corrupt header - is
refused (5); a field no system call could set is refused naming the entry instead of a
500 (7). Whatever is refused leaves no layer.

Tars tarfile cannot write are made here by hand, block by block.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest
from harness import need
from layer_tools import (
    T0,
    PluginClient,
    PluginError,
    TarBuilder,
    apply,
    make_layer,
    new_id,
)

from cvmfs_graphdriver.errors import DriverError, NotFoundError

pytestmark = pytest.mark.root

BLOCK = 512
END = bytes(2 * BLOCK)  # the end-of-archive marker, as Go's tar.Writer.Close writes it
GiB = 1 << 30
Text = Union[str, bytes, int]


# ---------------------------------------------------------------------------- raw tars


def _b(value: Text) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def header(name: Text, *, kind: bytes = b"0", size: int = 0, mode: int = 0o644,
           mtime: int = T0, link: Text = b"", gnu: bool = False,
           raw: Optional[Dict[int, bytes]] = None) -> bytes:
    """One 512-byte header (USTAR, or GNU's magic); `raw` overwrites bytes at offsets."""
    blk = bytearray(BLOCK)

    def put(off: int, data: bytes) -> None:
        blk[off:off + len(data)] = data

    put(0, _b(name)[:100])
    put(100, _octal(mode, 8))
    put(108, _octal(0, 8))
    put(116, _octal(0, 8))
    put(124, _octal(size, 12))
    put(136, _octal(mtime, 12))
    put(156, kind)
    put(157, _b(link)[:100])
    put(257, b"ustar  \0" if gnu else b"ustar\x0000")
    for off, data in (raw or {}).items():
        put(off, data)
    put(148, b" " * 8)
    put(148, b"%06o\0 " % sum(blk))
    return bytes(blk)


def entry(name: Text, data: bytes = b"", **kw) -> bytes:
    return header(name, size=len(data), **kw) + padded(data)


def pax_record(key: Text, value: Text) -> bytes:
    body = b" " + _b(key) + b"=" + _b(value) + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax(records: Sequence[Tuple[Text, Text]], kind: bytes = b"x") -> bytes:
    body = b"".join(pax_record(k, v) for k, v in records)
    return header("PaxHeaders.0/f", kind=kind, size=len(body)) + padded(body)


# ---------------------------------------------------------------------------- sparse tars
# A sparse file: its size and its data segments [(offset, bytes)]; the rest is holes.

Segments = List[Tuple[int, bytes]]


def gnu_sparse(name: str, size: int, segments: Segments) -> bytes:
    """GNU tar's --format=gnu: an 'S' entry, four map slots in its header and 21 in each
    extension block, the map ended by (size, 0) as GNU tar ends it."""
    slots = [(off, len(d)) for off, d in segments] + [(size, 0)]

    def structs(part: List[Tuple[int, int]]) -> bytes:
        return b"".join(_octal(o, 12) + _octal(n, 12) for o, n in part)

    first, rest = slots[:4], slots[4:]
    raw = {386: structs(first), 483: _octal(size, 12), 482: b"\x01" if rest else b"\0"}
    data = b"".join(d for _, d in segments)
    out = header(name, kind=b"S", size=len(data), gnu=True, raw=raw)
    while rest:
        part, rest = rest[:21], rest[21:]
        ext = bytearray(BLOCK)
        ext[:24 * len(part)] = structs(part)
        ext[504] = 1 if rest else 0
        out += bytes(ext)
    return out + padded(data)


def pax_sparse_00(name: str, size: int, segments: Segments) -> bytes:
    records: List[Tuple[Text, Text]] = [("GNU.sparse.size", size),
                                        ("GNU.sparse.numblocks", len(segments))]
    for off, d in segments:
        records += [("GNU.sparse.offset", off), ("GNU.sparse.numbytes", len(d))]
    return pax(records) + entry(name, b"".join(d for _, d in segments))


def pax_sparse_01(name: str, size: int, segments: Segments) -> bytes:
    smap = ",".join(f"{off},{len(d)}" for off, d in segments)
    return (pax([("GNU.sparse.size", size), ("GNU.sparse.numblocks", len(segments)),
                 ("GNU.sparse.name", name), ("GNU.sparse.map", smap)])
            + entry(f"GNUSparseFile.0/{name}", b"".join(d for _, d in segments)))


def pax_sparse_10(name: str, size: int, segments: Segments) -> bytes:
    smap = f"{len(segments)}\n" + "".join(f"{off}\n{len(d)}\n" for off, d in segments)
    return (pax([("GNU.sparse.major", 1), ("GNU.sparse.minor", 0), ("GNU.sparse.name", name),
                 ("GNU.sparse.realsize", size)])
            + entry(f"GNUSparseFile.0/{name}",
                    padded(smap.encode()) + b"".join(d for _, d in segments)))


SPARSE_FORMATS: Dict[str, Callable[[str, int, Segments], bytes]] = {
    "gnu": gnu_sparse, "pax-0.0": pax_sparse_00, "pax-0.1": pax_sparse_01,
    "pax-1.0": pax_sparse_10,
}


def data_extents(path: str) -> List[Tuple[int, int]]:
    """(start, end) of the parts of a file that hold data (SEEK_DATA / SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def assert_sparse_file(path: str, size: int, segments: Segments) -> None:
    """The file is `size` bytes, its segments hold their data, everything else reads as
    zeros, and it takes a few blocks, not `size` bytes."""
    st = os.stat(path)
    assert st.st_size == size
    assert st.st_blocks * 512 <= 64 * 1024 + 2 * sum(len(d) for _, d in segments), \
        f"{st.st_blocks * 512} bytes of disk for {sum(len(d) for _, d in segments)} of data"
    with open(path, "rb") as f:
        for start, end in data_extents(path):
            f.seek(start)
            got = f.read(end - start)
            want = bytearray(end - start)
            for off, d in segments:
                lo, hi = max(off, start), min(off + len(d), end)
                if lo < hi:
                    want[lo - start:hi - start] = d[lo - off:hi - off]
            assert got == bytes(want), (start, end)
        for off, d in segments:
            f.seek(off)
            assert f.read(len(d)) == d


def assert_no_layer(drv, layer: str) -> None:
    """A refused ApplyDiff leaves no layer dockerd could use."""
    assert not drv.exists(layer)
    with pytest.raises(NotFoundError):
        drv.get(layer)


def refused(drv, data: bytes, *words: str) -> str:
    layer = make_layer(drv)
    with pytest.raises(DriverError) as e:
        apply(drv, layer, "", data)
    msg = str(e.value)
    assert layer in msg, msg
    for word in words:
        assert word in msg, msg
    assert_no_layer(drv, layer)
    return msg


# ---------------------------------------------------------------------------- finding 3


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_sparse_entry_is_written_with_holes(drv, fmt):
    """A few KiB of tar with a 1 GiB sparse member: before, the GiB was written (a 4 GiB
    member took 4 GiB of disk and 15-31 s)."""
    segments = [(999_424, b"a" * 4096), (5_000_001, b"unaligned"), (GiB - 4, b"tail")]
    data = SPARSE_FORMATS[fmt]("big", GiB, segments) + entry("after", b"next") + END
    assert len(data) <= 10 * 1024
    layer = make_layer(drv, data=data)
    diff = os.path.join(drv.layout.home, layer, "diff")
    assert_sparse_file(os.path.join(diff, "big"), GiB, segments)
    with open(os.path.join(diff, "after"), "rb") as f:
        assert f.read() == b"next"


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_sparse_entry_reads_back_byte_for_byte_as_tarfile_extracts_it_densely(drv, fmt):
    # 30 segments: GNU's 'S' entry needs two extension blocks; the file ends in a hole
    segments = [(i * 100_003, bytes([i + 1]) * (i * 137 % 5000 + 1)) for i in range(30)]
    size = (3 << 20) + 123
    data = SPARSE_FORMATS[fmt]("f", size, segments) + END
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as t:
        m = t.next()
        assert m is not None and m.name == "f" and m.sparse is not None
        src = t.extractfile(m)
        assert src is not None
        dense = src.read()
    assert len(dense) == size
    layer = make_layer(drv, data=data)
    path = os.path.join(drv.layout.home, layer, "diff", "f")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(dense).hexdigest()
    assert_sparse_file(path, size, segments)


def test_sparse_tars_made_by_gnu_tar(drv, tmp_path):
    tar = shutil.which("tar")
    need(tar is not None and b"GNU tar" in subprocess.run(
        [tar or "tar", "--version"], capture_output=True).stdout, "needs GNU tar")
    src = tmp_path / "src"
    src.mkdir()
    segments = [(999_424, b"x" * 4096), (GiB - 4, b"tail")]
    with open(src / "big", "wb") as f:
        f.truncate(GiB)
        for off, d in segments:
            f.seek(off)
            f.write(d)
    for fmt in (["--format=gnu"], ["--format=posix", "--sparse-version=0.0"],
                ["--format=posix", "--sparse-version=0.1"],
                ["--format=posix", "--sparse-version=1.0"]):
        data = subprocess.run([str(tar), "--sparse", *fmt, "-C", str(src), "-cf", "-", "big"],
                              capture_output=True, check=True).stdout
        assert len(data) <= 20 * 1024, fmt
        layer = make_layer(drv, data=data)
        assert_sparse_file(os.path.join(drv.layout.home, layer, "diff", "big"), GiB,
                           segments)


def test_layer_beyond_max_layer_bytes_is_refused_naming_the_entry_and_the_limit(new_driver):
    drv = new_driver(max_layer_bytes=1 << 20)
    data = TarBuilder().file("a", b"a" * 600_000).file("b", b"b" * 600_000).bytes()
    msg = refused(drv, data, "'b'", "max_layer_bytes = 1048576", "1.1 MiB")
    assert "'a'" not in msg
    # its apparent size counts: a sparse GiB is beyond the limit too
    refused(drv, gnu_sparse("big", GiB, [(0, b"x")]) + END, "'big'", "max_layer_bytes")
    # within the limit
    layer = make_layer(drv, data=TarBuilder().file("a", b"a" * 600_000).bytes())
    assert drv.exists(layer)


@pytest.fixture
def small_fs(new_driver, tmp_path) -> Iterator[str]:
    """A 16 MiB filesystem (unmounted before new_driver checks for leftover mounts)."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "cgd-small",
                    str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_layer_beyond_the_free_space_is_refused_before_it_is_written(new_driver, small_fs,
                                                                     sparse):
    drv = new_driver(os.path.join(small_fs, "home"))
    if sparse:
        data = gnu_sparse("big", GiB, [(0, b"head"), (GiB - 4, b"tail")]) + END
    else:
        data = TarBuilder().file("big", b"x" * (20 << 20)).bytes()
    free = os.statvfs(small_fs).f_bavail
    msg = refused(drv, data, "'big'", "free space of the filesystem")
    assert "20.0 MiB" in msg or "1.0 GiB" in msg, msg
    assert os.statvfs(small_fs).f_bavail >= free - 16  # nothing of it was written


# ---------------------------------------------------------------------------- finding 4


def test_pax_header_claiming_a_gib_is_refused_before_it_is_read(drv):
    data = (header("PaxHeaders.0/f", kind=b"x", size=GiB) + padded(pax_record("comment", "x"))
            + entry("f", b"x") + END)
    refused(drv, data, "offset 0", "a PAX extended header of 1073741824 bytes", "1.0 MiB")


RSS_PROBE = textwrap.dedent('''
    import io, resource, sys, tarfile
    from cvmfs_graphdriver import archive

    size, root = int(sys.argv[1]), sys.argv[2]

    def header(name, size, kind):
        ti = tarfile.TarInfo(name)
        ti.size, ti.type = size, kind
        return ti.tobuf(format=tarfile.USTAR_FORMAT)

    def chunks():  # a PAX header of `size` bytes: one xattr record, streamed
        prefix = b" SCHILY.xattr.user.big="
        body = len(prefix) + (size - 64) + 1
        total = body + len(str(body))
        if len(str(total)) + body != total:
            total += 1
        yield header("PaxHeaders.0/f", total, tarfile.XHDTYPE) + str(total).encode() + prefix
        left = size - 64
        while left:
            n = min(left, 1 << 20)
            left -= n
            yield b"v" * n
        yield b"\\n" + bytes(-total % 512) + header("f", 0, tarfile.REGTYPE) + bytes(1024)

    class Stream(io.RawIOBase):
        def __init__(self):
            self.it, self.buf = chunks(), b""
        def readable(self):
            return True
        def readinto(self, b):
            while not self.buf:
                self.buf = next(self.it, None)
                if self.buf is None:
                    return 0
            n = min(len(b), len(self.buf))
            b[:n], self.buf = self.buf[:n], self.buf[n:]
            return n

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        archive.apply_tar(io.BufferedReader(Stream(), 1 << 16), root, None)
        print("accepted")
    except Exception as e:
        print(type(e).__name__, e)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
''')


def test_a_huge_pax_header_takes_no_memory(tmp_path):
    """256 MiB of PAX header streamed in: before, tarfile read it whole (a 1 GiB header
    took the daemon to 3 GiB of RSS)."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(256 << 20), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    *said, grew = out.stdout.splitlines()
    assert said[0].startswith("DriverError") and "PAX extended header" in said[0], said
    assert int(grew) < 32 * 1024, f"max RSS grew by {int(grew) // 1024} MiB"


@pytest.mark.timeout(60)
def test_a_pax_header_of_digits_is_read_in_linear_time(drv):
    """CVE-2024-6232: tarfile's PAX regular expressions take quadratic time on Pythons
    without its fix - this venv's 3.11.7 took 13 s for 64 KiB of digits, and a 1 MiB
    header (within the bound) would take about an hour. Well-formed, it is a layer."""
    started = time.monotonic()
    layer = make_layer(drv, data=pax([("comment", "1" * 1_000_000)]) + entry("f", b"x") + END)
    assert time.monotonic() - started < 10
    assert drv.exists(layer)


def test_a_chain_of_special_headers_is_refused(drv):
    """10,000 PAX headers before one entry: before, tarfile recursed once per header
    (RecursionError, a 500)."""
    data = pax([("comment", "x")]) * 10_000 + entry("f", b"x") + END
    refused(drv, data, "more than 8 special headers", "offset 0")


def test_a_gnu_long_name_claiming_megabytes_is_refused(drv):
    data = (header("././@LongLink", kind=b"L", size=2 << 20, gnu=True) + padded(b"a" * 300)
            + entry("f", b"x") + END)
    refused(drv, data, "a GNU long name of 2097152 bytes", "1.0 MiB")


def test_endless_gnu_sparse_extension_blocks_are_refused(drv):
    """An 'S' entry whose extension blocks each say another follows: before, read until
    the stream ended (then an IndexError, a 500)."""
    ext = bytearray(BLOCK)
    for i in range(21):
        ext[24 * i:24 * i + 24] = _octal(1000 * (i + 1), 12) + _octal(1, 12)
    ext[504] = 1
    data = (header("f", kind=b"S", gnu=True, raw={482: b"\x01", 483: _octal(1 << 40, 12)})
            + bytes(ext) * 3000 + END)
    refused(drv, data, "extension blocks of a GNU sparse entry", "1.0 MiB")


def test_a_pax_sparse_map_claiming_a_billion_segments_is_refused(drv):
    smap = b"1000000000\n" + b"0\n1\n" * 300_000
    data = (pax([("GNU.sparse.major", 1), ("GNU.sparse.minor", 0), ("GNU.sparse.name", "f"),
                 ("GNU.sparse.realsize", 1 << 40)])
            + entry("GNUSparseFile.0/f", smap) + END)
    refused(drv, data, "sparse map (PAX sparse 1.0)", "1.0 MiB")


def test_special_headers_within_the_bounds_work_and_global_headers_are_ignored(drv):
    """A global header, a PAX header of nearly 1 MiB and GNU long names are read; the
    global header's records are ignored, as moby ignores them (tarfile applied them to
    every later entry)."""
    long_dir = "/".join(["d" * 200] * 3)
    data = (pax([("SCHILY.xattr.user.global", "everywhere"), ("path", "renamed")],
                kind=b"g")
            + pax([("path", long_dir)]) + header("x", kind=b"5")
            + pax([("comment", "c" * 1_000_000), ("SCHILY.xattr.user.own", "mine")])
            + entry("f", b"data")
            + entry("././@LongLink", f"{long_dir}/long-name\0".encode(), kind=b"L", gnu=True)
            + entry("././@LongLink", f"{long_dir}/long-target\0".encode(), kind=b"K",
                    gnu=True)
            + header("short", kind=b"2", gnu=True)
            + END)
    layer = make_layer(drv, data=data)
    diff = os.path.join(drv.layout.home, layer, "diff")
    assert sorted(os.listdir(diff)) == ["d" * 200, "f"]
    assert os.getxattr(os.path.join(diff, "f"), "user.own") == b"mine"
    assert "user.global" not in os.listxattr(os.path.join(diff, "f"))
    assert os.readlink(os.path.join(diff, long_dir, "long-name")) == f"{long_dir}/long-target"


# ---------------------------------------------------------------------------- finding 5

_A = entry("a", b"a" * 1000)  # offset 0: header, 1000 bytes, padding to 1536
_B = entry("b", b"b" * 1000)  # offset 1536: header at 1536, data 2048-3048, padding to 3072

TRUNCATED = [
    ("stops-after-an-entry", _A, ["stops at offset 1536 (after entry 'a')",
                                  "without the end-of-archive marker"]),
    ("stops-after-the-last-entry", _A + _B, ["stops at offset 3072 (after entry 'b')",
                                             "end-of-archive"]),
    ("corrupt-second-header", _A + b"\x01" * BLOCK + _B[BLOCK:] + END,
     ["corrupt header at offset 1536 (after entry 'a')"]),
    ("ends-inside-a-header", _A + _B[:100], ["ends inside the header at offset 1536"]),
    ("ends-inside-data", (_A + _B)[:2500], ["'b'", "ends inside its data",
                                            "548 of 1000 bytes missing"]),
    ("ends-inside-padding", (_A + _B)[:3060], ["'b'", "inside the padding"]),
    ("zero-block-then-an-entry", _A + bytes(BLOCK) + _B + END,
     ["zero block at offset 1536 (after entry 'a') followed by more data"]),
    ("ends-inside-the-end-marker", _A + bytes(BLOCK) + bytes(100),
     ["ends inside its end-of-archive marker"]),
    ("empty", b"", ["layer data is empty"]),
]


@pytest.mark.parametrize("data, words", [(d, w) for _, d, w in TRUNCATED],
                         ids=[i for i, _, _ in TRUNCATED])
def test_truncated_or_damaged_layer_is_refused_and_leaves_no_layer(drv, data, words):
    refused(drv, data, *words)


ACCEPTED = [
    ("two-zero-blocks", _A + _B + END),
    ("one-zero-block-then-the-end", _A + _B + bytes(BLOCK)),  # Go accepts it too
    ("anything-after-two-zero-blocks", _A + _B + END + b"ignored, as Go ignores it"),
    ("tarfile-padded-to-its-record-size",
     TarBuilder().file("a", b"a" * 1000).file("b", b"b" * 1000).bytes()),
]


@pytest.mark.parametrize("data", [d for _, d in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_complete_layer_endings_are_accepted(drv, data):
    layer = make_layer(drv, data=data)
    assert sorted(os.listdir(os.path.join(drv.layout.home, layer, "diff"))) == ["a", "b"]


def test_empty_layer_is_accepted(drv):
    layer = make_layer(drv, data=END)
    assert os.listdir(os.path.join(drv.layout.home, layer, "diff")) == []


def test_tar_of_the_tar_command_is_accepted(drv, tmp_path):
    tar = shutil.which("tar")
    need(tar is not None, "needs the tar command")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f" * 3000)
    data = subprocess.run([str(tar), "-C", str(src), "-cf", "-", "d"], capture_output=True,
                          check=True).stdout
    layer = make_layer(drv, data=data)
    with open(os.path.join(drv.layout.home, layer, "diff", "d", "f"), "rb") as f:
        assert f.read() == b"f" * 3000


# ---------------------------------------------------------------------------- finding 7

_HUGE = "1" + "0" * 30
BAD_FIELDS = [
    ("pax-mtime-huge", pax([("mtime", _HUGE)]) + entry("f", b"x"), "f",
     ["PAX mtime", "beyond what a 64-bit time holds"]),
    ("pax-mtime-inf", pax([("mtime", "1e400")]) + entry("f", b"x"), "f",
     ["PAX mtime '1e400' is not a time"]),
    ("pax-atime-huge", pax([("atime", _HUGE)]) + entry("f", b"x"), "f", ["PAX atime"]),
    ("base256-mtime-huge",
     header("f", raw={136: b"\x80" + (1 << 80).to_bytes(11, "big")}), "f",
     ["mtime 1208925819614629174706176 is beyond what a 64-bit time holds"]),
    ("dir-mtime-huge", pax([("mtime", _HUGE)]) + header("d", kind=b"5"), "d", ["PAX mtime"]),
    ("uid-minus-one", pax([("uid", 2**32 - 1)]) + entry("f", b"x"), "f",
     ["uid 4294967295 is out of range (0 to 4294967294)"]),
    ("uid-beyond-32-bits", pax([("uid", 2**32)]) + entry("f", b"x"), "f", ["uid 4294967296"]),
    ("gid-negative", pax([("gid", -1)]) + entry("f", b"x"), "f", ["gid -1 is out of range"]),
    ("uid-not-a-number", pax([("uid", "abc")]) + entry("f", b"x"), "f",
     ["PAX uid 'abc' is not a number"]),
    ("symlink-uid-huge", pax([("uid", 2**40)]) + header("s", kind=b"2", link="t"), "s",
     ["uid 1099511627776"]),
    ("xattr-name-with-nul", pax([(b"SCHILY.xattr.user.a\0b", "v")]) + entry("f", b"x"), "f",
     ["xattr name 'user.a\\x00b'", "no NUL byte"]),
    ("xattr-name-too-long", pax([("SCHILY.xattr.user." + "n" * 300, "v")]) + entry("f"), "f",
     ["xattr name", "1 to 255 bytes"]),
    ("xattr-value-too-big", pax([("SCHILY.xattr.user.big", "v" * 70_000)]) + entry("f"), "f",
     ["xattr 'user.big' holds 70000 bytes", "65536"]),
    ("component-beyond-name-max", pax([("path", "a" * 256)]) + entry("x", b"x"), "aaaa",
     ["component of 256 bytes", "NAME_MAX"]),
    ("symlink-target-beyond-path-max",
     pax([("linkpath", "t" * 4096)]) + header("s", kind=b"2"), "s",
     ["symlink target", "PATH_MAX"]),
    ("symlink-target-with-nul", pax([("linkpath", b"a\0b")]) + header("s", kind=b"2"), "s",
     ["symlink target 'a\\x00b' contains a NUL byte"]),
    ("hard-link-target-beyond-name-max",
     entry("t", b"x") + pax([("linkpath", "t" * 300)]) + header("h", kind=b"1"), "h",
     ["hard link target", "component of 300 bytes", "NAME_MAX"]),
    ("device-major-beyond-12-bits", header("dev", kind=b"3", raw={329: _octal(5000, 8)}),
     "dev", ["device 5000:0 is out of range"]),
    ("sparse-map-not-numbers",
     pax([("GNU.sparse.size", 10), ("GNU.sparse.map", "0,x")]) + entry("f", b"x"), "offset 0",
     ["the sparse map holds b'x', not a number"]),
    ("sparse-size-not-a-number",
     pax([("GNU.sparse.size", "ten"), ("GNU.sparse.map", "0,1")]) + entry("f", b"x"),
     "offset 0", ["malformed header"]),
]


@pytest.mark.parametrize("data, shown, words", [(d, s, w) for _, d, s, w in BAD_FIELDS],
                         ids=[i for i, _, _, _ in BAD_FIELDS])
def test_field_no_system_call_takes_is_refused_naming_the_entry(drv, data, shown, words):
    refused(drv, data + END, shown, *words)


@pytest.fixture
def inited(plugin, tmp_path) -> PluginClient:
    plugin.call("Plugin.Activate")
    plugin.call("GraphDriver.Init", {"Home": str(tmp_path / "home"), "Opts": None,
                                     "UIDMaps": None, "GIDMaps": None})
    return plugin


@pytest.mark.parametrize("case", ["pax-mtime-huge", "base256-mtime-huge", "uid-beyond-32-bits",
                                  "xattr-name-with-nul", "symlink-target-with-nul",
                                  "sparse-size-not-a-number"])
def test_plugin_answers_bad_fields_with_an_error_not_a_500(inited, case):
    """Before, an OverflowError or ValueError from os.utime, os.chown, os.setxattr or
    tarfile escaped as an internal error (HTTP 500)."""
    data, shown, words = next((d, s, w) for i, d, s, w in BAD_FIELDS if i == case)
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    with pytest.raises(PluginError) as e:
        inited.apply_diff(layer, "", data + END)
    assert e.value.status == 200, e.value.message
    for word in [layer, shown, *words]:
        assert word in e.value.message, e.value.message
    assert inited.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
