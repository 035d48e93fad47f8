"""Fuzzing the tar applier (archive.apply_tar, reading through tarread): generated layer
tars of every entry type, PAX records, GNU and PAX sparse members and whiteout markers,
hostile names and links, and byte-level mutations of all of them.

Property: apply_tar into a fresh directory either succeeds or raises DriverError
(UnsafeLayerError is one) - never another exception; nothing outside the target
directory is created or changed (a sentinel directory beside it, and the absolute
paths the tars name); no file descriptor is left open.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from typing import Dict, List, Optional, Tuple

import pytest
from fuzzkit import examples, open_fds
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_graphdriver import archive, whiteouts
from cvmfs_graphdriver.errors import DriverError

pytestmark = pytest.mark.root

# Where every example's directories go: <BASE>/<n>/{target,sentinel}. Names in the tars
# that mean to escape aim at the sentinel, by "../sentinel" and by its absolute path
# (SENTINEL stands for it in the generated names).
SENTINEL = "\x01SENTINEL"

SAFE = ["a", "b", "c", "d", "l", ".wh.a", ".wh.b", ".wh..wh..opq", "é", "x" * 120]
HOSTILE = ["..", ".", "", ".wh.", ".wh..", ".wh..wh.plnk", "\udcff", "y" * 256, "sentinel",
           SENTINEL, "a\x00b"]
# Mostly names a layer may hold; one component in six is hostile.
COMPONENT = st.sampled_from(SAFE * 5 + HOSTILE)
LINK_TARGETS = ["a", "b", "a/b", "c/d", "..", "../sentinel", "../sentinel/victim",
                "../../sentinel", SENTINEL, SENTINEL + "/victim", "/", "/etc/passwd", "l",
                "l/victim", ".", "", "a/../../sentinel/victim", "z" * 4100, "a\x00"]
XATTR_NAMES = ["user.x", "user.y", "trusted.overlay.opaque", "trusted.overlay.redirect",
               "security.capability", "trusted.t", "system.posix_acl_access", "", "user.\x00",
               "user." + "n" * 260, "bogus.name"]
PAX_RECORDS = [("mtime", "1600000000.5"), ("mtime", "-1.25"), ("mtime", "abc"),
               ("mtime", "99999999999999999999"), ("atime", "1.000000001"), ("atime", "x"),
               ("uid", "4294967295"), ("uid", "-1"), ("uid", "1e3"), ("gid", "70000"),
               ("size", "-1"), ("size", "1x"), ("linkpath", "../sentinel"),
               ("path", "../sentinel/evil"), ("path", "a/b"), ("uname", "root"),
               ("GNU.sparse.realsize", "x"), ("GNU.sparse.size", "12"), ("comment", "ok"),
               ("hdrcharset", "BINARY"), ("mtime", "")]
KINDS = ["dir", "dir", "file", "file", "symlink", "hardlink", "fifo", "chr", "blk", "marker",
         "sparse", "opaque"]


def _name(parts: List[str], absolute: bool, sentinel: str) -> str:
    name = "/".join(parts)
    if absolute:
        name = "/" + name
    return name.replace(SENTINEL, sentinel)


@st.composite
def entries(draw: st.DrawFn, hostile: bool) -> dict:
    """One tar entry: a well-formed one, or (`hostile`) one with some fields hostile now
    and then."""
    kind = draw(st.sampled_from(KINDS))
    e: dict = {"kind": kind, "parts": draw(st.lists(COMPONENT if hostile else st.sampled_from(
                   SAFE), min_size=1, max_size=3)),
               "absolute": hostile and draw(st.integers(0, 9)) == 0,
               "mode": draw(st.sampled_from([0o755, 0o644, 0o4755, 0o000, 0o7777])),
               "uid": 0, "gid": 0, "mtime": 1_600_000_000, "xattrs": {}, "pax": []}
    if draw(st.integers(0, 2)) == 0:  # owner, time
        e["uid"] = draw(st.sampled_from([0, 1000, 65534, 2**21 - 1]))
        e["gid"] = draw(st.sampled_from([0, 1000, 65534]))
        e["mtime"] = draw(st.sampled_from([1_600_000_000, 0, -1, 2**33, 1.5]))
    if draw(st.integers(0, 2)) == 0:  # xattrs, PAX records
        if not hostile:
            e["xattrs"] = draw(st.dictionaries(st.sampled_from(["user.x", "trusted.t"]),
                                               st.sampled_from(["", "v", "é"]), max_size=2))
            e["pax"] = draw(st.lists(st.sampled_from(PAX_RECORDS[:1] + PAX_RECORDS[4:5]),
                                     max_size=1))
            return _finish(draw, e, hostile)
        e["xattrs"] = draw(st.dictionaries(st.sampled_from(XATTR_NAMES), st.sampled_from(
            ["", "v", "y", "\udcff", "w" * 300]), max_size=2))
        e["pax"] = draw(st.lists(st.sampled_from(PAX_RECORDS), max_size=2))
    return _finish(draw, e, hostile)


def _finish(draw: st.DrawFn, e: dict, hostile: bool) -> dict:
    kind = e["kind"]
    if kind in ("file", "sparse"):
        e["data"] = draw(st.binary(max_size=64)) * draw(st.sampled_from([1, 1, 20]))
    if kind == "sparse":
        e["segments"] = draw(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 600)),
                                      max_size=3))
        e["realsize"] = draw(st.integers(0, 4000))
        if not hostile:  # in order, apart, within the size: a map GNU tar writes
            end, segs = 0, []
            for gap, length in e["segments"]:
                segs.append((end + gap, length))
                end += gap + length
            e["segments"], e["realsize"] = segs, end + e["realsize"] % 100
    if kind in ("symlink", "hardlink"):
        safe = st.lists(st.sampled_from(SAFE), min_size=1, max_size=3).map("/".join)
        e["target"] = draw(st.sampled_from(LINK_TARGETS) | safe if hostile else safe)
    if kind in ("chr", "blk"):
        e["dev"] = (draw(st.sampled_from([0, 1, 4095] + [4096] * hostile)),
                    draw(st.sampled_from([0, 3] + [2**20] * hostile)))
    return e


def _info(e: dict, sentinel: str) -> Tuple[tarfile.TarInfo, Optional[bytes]]:
    name = _name(e["parts"], e["absolute"], sentinel)
    kind = e["kind"]
    if kind == "marker":
        name = name.rstrip("/") + "/.wh." + e["parts"][-1]
    elif kind == "opaque":
        name = name.rstrip("/") + "/.wh..wh..opq"
    ti = tarfile.TarInfo(name)
    ti.mode, ti.uid, ti.gid, ti.mtime = e["mode"], e["uid"], e["gid"], e["mtime"]
    data: Optional[bytes] = None
    if kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif kind in ("file", "marker", "opaque"):
        data = e["data"] if kind == "file" else b""
        ti.size = len(data)
    elif kind == "sparse":
        # PAX sparse 0.1: the map in a record, the stored segments as the data.
        segs = [(off, min(ln, len(e["data"]))) for off, ln in e["segments"]]
        data = e["data"][:sum(ln for _, ln in segs)].ljust(sum(ln for _, ln in segs), b"s")
        ti.size = len(data)
        ti.pax_headers.update({
            "GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": name,
            "GNU.sparse.realsize": str(e["realsize"]),
            "GNU.sparse.map": ",".join(f"{o},{ln}" for o, ln in segs) or "0,0"})
    elif kind in ("symlink", "hardlink"):
        ti.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        ti.linkname = e["target"].replace(SENTINEL, sentinel)
    elif kind == "fifo":
        ti.type = tarfile.FIFOTYPE
    else:
        ti.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = e["dev"]
    for key, value in e["xattrs"].items():
        ti.pax_headers["SCHILY.xattr." + key] = value
    for key, value in e["pax"]:
        ti.pax_headers[key] = value
    return ti, data


def build_tar(items: List[dict], sentinel: str, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tar:
        for e in items:
            ti, data = _info(e, sentinel)
            if fmt != tarfile.PAX_FORMAT:
                ti.pax_headers = {}
            try:
                tar.addfile(ti, io.BytesIO(data) if data is not None else None)
            except (ValueError, UnicodeError, OverflowError):
                continue  # tarfile cannot write it in this format: leave it out
    return buf.getvalue()


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """Byte-level damage: flips, overwrites, truncation, insertions, duplicated blocks."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup", "field"]))
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[at] = draw(st.sampled_from([0, 0x20, 0x30, 0x37, 0x80, 0xff, ord("x"),
                                            ord("L"), ord("K"), ord("S"), ord("g")]))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=600))
        elif op == "dup":
            blk = at - at % 512
            out[blk:blk] = out[blk:blk + 512]
        else:  # a header field overwritten with digits of a plausible width
            blk = at - at % 512
            off = draw(st.sampled_from([100, 108, 116, 124, 136, 148, 156, 157, 329, 337,
                                        345, 482, 483]))
            value = draw(st.sampled_from([b"77777777777", b"00000000000", b"-1", b"\x80\xff\xff",
                                          b"\xff" * 12, b"1", b"S", b"x", b"g", b"7"]))
            out[blk + off:blk + off + len(value)] = value
    return bytes(out)


def _tree(root: str) -> Dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            s = os.lstat(full)
            extra = b""
            if stat.S_ISREG(s.st_mode):
                with open(full, "rb") as f:
                    extra = hashlib.sha256(f.read()).digest()
            elif stat.S_ISLNK(s.st_mode):
                extra = os.fsencode(os.readlink(full))
            xattrs = tuple(sorted(os.listxattr(full, follow_symlinks=False)))
            out[full] = (s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_mtime_ns, s.st_nlink,
                         s.st_ino, extra, xattrs)
    return out


class Arena:
    """A base directory: per example, a fresh target beside a sentinel directory."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.sentinel = os.path.join(base, "sentinel")
        os.makedirs(os.path.join(self.sentinel, "dir"))
        with open(os.path.join(self.sentinel, "victim"), "w") as f:
            f.write("original")
        os.symlink("/etc/passwd", os.path.join(self.sentinel, "link"))
        self.watched = ["/etc/passwd", "/etc/shadow", "/evil", "/a", "/b", "/l"]
        self.before = self.outside()

    def outside(self) -> tuple:
        states = []
        for p in self.watched:
            try:
                s = os.lstat(p)
                states.append((p, s.st_mode, s.st_uid, s.st_size, s.st_mtime_ns, s.st_nlink))
            except FileNotFoundError:
                states.append((p, None))
        with os.scandir(self.base) as it:
            names = sorted(e.name for e in it)
        return names, _tree(self.sentinel), tuple(states)

    def apply(self, data: bytes, converter_kind: str, tally) -> None:
        target = tempfile.mkdtemp(dir=self.base, prefix="t")
        converter = {"none": None, "overlay": whiteouts.OverlayUpper(),
                     "flatten": whiteouts.Flatten()}[converter_kind]
        fds = open_fds()
        try:
            archive.apply_tar(io.BytesIO(data), target, converter)
            refused = False
        except DriverError:
            refused = True
        finally:
            leaked = open_fds() - fds
            if leaked:
                tally.leaks(leaked)
            shutil.rmtree(target)
        tally.hostile(refused=refused)
        assert leaked == 0, f"{leaked} file descriptor(s) left open by apply_tar"
        assert self.outside() == self.before, "apply_tar changed something outside its target"


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> Arena:
    return Arena(str(tmp_path_factory.mktemp("arena")))


CONVERTERS = st.sampled_from(["none", "overlay", "flatten"])
FORMATS = st.sampled_from([tarfile.PAX_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])


@settings(max_examples=examples(150))
@given(items=st.booleans().flatmap(lambda hostile: st.lists(entries(hostile), max_size=8)),
       fmt=FORMATS, converter=CONVERTERS)
def test_generated_layer_tars_are_applied_or_refused_and_contained(arena, tally, items, fmt,
                                                                   converter):
    arena.apply(build_tar(items, arena.sentinel, fmt), converter, tally)


@settings(max_examples=examples(150))
@given(data=st.data(), items=st.lists(entries(False), min_size=1, max_size=5), fmt=FORMATS,
       converter=CONVERTERS)
def test_damaged_layer_tars_are_applied_or_refused_and_contained(arena, tally, data, items,
                                                                 fmt, converter):
    raw = build_tar(items, arena.sentinel, fmt)
    arena.apply(data.draw(mutations(raw)), converter, tally)


@settings(max_examples=examples(100))
@given(raw=st.binary(max_size=3000), converter=CONVERTERS)
def test_arbitrary_bytes_are_refused_or_contained(arena, tally, raw, converter):
    arena.apply(raw, converter, tally)
