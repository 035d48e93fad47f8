"""Byte identity of our native Diff with overlay2's.

overlay2's Diff of a layer against its direct parent is moby's
`archive.TarWithOptions(<home>/<id>/diff, {Uncompressed, OverlayWhiteoutFormat})`:
Go's archive/tar writer fed by moby's FileInfoHeader. A committed layer's diff ID is
the sha256 of that stream, so ours must be the same bytes, not merely the same files.

The reference is `tarref` (conformance/gopath/src/cvmfsconformance/tarref), built from
Debian's moby 20.10.24 and Go 1.19 sources (the same as Debian 12's dockerd) by
scripts/build-go-tool.sh tarref. Each case fills the upper dir of a real layer (created by our
Driver, its parent the direct parent so that Diff takes the native path) with a tree
made of one kind of awkward entry, then compares our Diff with `tarref <upper dir>` byte
for byte. Each case first checks that the reference stream really contains the edge the
case is about (a guard against a tree that quietly stopped exercising it), and a
mismatch is explained header field by header field.
"""

from __future__ import annotations

import difflib
import grp
import hashlib
import io
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import pytest
from harness import need
from layer_tools import make_layer

pytestmark = pytest.mark.root

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
BUILD_SCRIPT = os.path.join(TOP, "scripts", "build-go-tool.sh")

T = 1_700_000_000  # whole-second base mtime; every entry gets its own second after it
NS = 1_000_000_000
GIB = 1 << 30

Name = Union[str, bytes]


# ---------------------------------------------------------------------------- the two sides


def write_our_diff(drv, layer: str, parent: str, out) -> None:
    """The one place that asks our driver for its Diff (adapt here if the API changes)."""
    drv.diff(layer, parent, out)


@pytest.fixture(scope="session")
def tarref() -> str:
    """Path of the reference program, built (or found up to date) by the build script."""
    need(os.geteuid() == 0, "needs root (the Go toolchain may have to be installed)")
    r = subprocess.run(["bash", BUILD_SCRIPT, "tarref"], capture_output=True, text=True,
                       timeout=1800)
    need(r.returncode == 0, f"cannot build tarref ({BUILD_SCRIPT}):\n{r.stderr[-3000:]}")
    path = r.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"{BUILD_SCRIPT} printed {path!r}, not a program"
    return path


def reference_tar(tarref: str, upper: str) -> Tuple[bytes, str]:
    """What overlay2's Diff streams for this upper dir, and moby's log lines."""
    r = subprocess.run([tarref, upper], capture_output=True, timeout=600)
    assert r.returncode == 0, f"tarref failed ({r.returncode}): {r.stderr.decode(errors='replace')}"
    return r.stdout, r.stderr.decode(errors="replace")


@dataclass
class Upper:
    drv: object
    layer: str
    parent: str
    path: str  # <home>/<layer>/diff
    outside: str  # a directory on the same filesystem, outside the layer


@pytest.fixture
def upper(new_driver, tmp_path) -> Upper:
    """A container layer on a base layer: Diff(layer, base) is the native diff of `path`."""
    home = str(tmp_path / "home")
    drv = new_driver(home)
    status = dict((row[0], row[1]) for row in drv.status())
    assert status.get("Native Overlay Diff") == "true", (
        f"the driver would not take the native diff path here: {status}")
    base = make_layer(drv)
    layer = make_layer(drv, base, rw=True)
    path = os.path.join(home, layer, "diff")
    assert os.path.isdir(path) and os.listdir(path) == [], path
    outside = str(tmp_path / "outside")
    os.mkdir(outside)
    return Upper(drv, layer, base, path, outside)


def our_diff(u: Upper) -> bytes:
    out = io.BytesIO()
    write_our_diff(u.drv, u.layer, u.parent, out)
    return out.getvalue()


# ---------------------------------------------------------------------------- raw tar view

HEADER_FIELDS = (
    ("name", 0, 100), ("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124),
    ("size", 124, 136), ("mtime", 136, 148), ("chksum", 148, 156), ("typeflag", 156, 157),
    ("linkname", 157, 257), ("magic", 257, 263), ("version", 263, 265),
    ("uname", 265, 297), ("gname", 297, 329), ("devmajor", 329, 337),
    ("devminor", 337, 345), ("prefix", 345, 500), ("pad", 500, 512),
)
EXTENDED = (b"x", b"g", b"L", b"K")  # headers that describe the next entry
HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")


def _num(raw: bytes) -> Optional[int]:
    if raw and raw[0] & 0x80:  # base-256
        n = int.from_bytes(raw[1:], "big")
        return n - (1 << (8 * len(raw) - 8)) if raw[0] & 0x40 else n
    s = raw.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        return None


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _pax_records(data: bytes) -> List[Tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            out.append((b"<junk>", data[pos:]))
            break
        try:
            n = int(data[pos:sp])
        except ValueError:
            out.append((b"<junk>", data[pos:]))
            break
        rec = data[sp + 1: pos + n]
        k, _, v = rec.partition(b"=")
        out.append((k, v[:-1] if v.endswith(b"\n") else v))
        pos += max(n, 1)
    return out


@dataclass
class Header:
    offset: int
    fields: Dict[str, bytes]
    data_offset: int
    data: bytes  # content (may be cut short when only a head of the stream is kept)
    size: int

    @property
    def typeflag(self) -> bytes:
        return self.fields["typeflag"]


@dataclass
class Member:
    """One logical entry: its extended headers (PAX, GNU long names) and its header."""

    index: int
    ext: List[Header]
    hdr: Header

    @property
    def offset(self) -> int:
        return self.ext[0].offset if self.ext else self.hdr.offset

    @property
    def end(self) -> int:
        return self.hdr.data_offset + (self.hdr.size + 511) // 512 * 512

    @property
    def pax(self) -> List[Tuple[bytes, bytes]]:
        return [r for h in self.ext if h.typeflag == b"x" for r in _pax_records(h.data)]

    @property
    def paxd(self) -> Dict[bytes, bytes]:
        return dict(self.pax)

    @property
    def path(self) -> bytes:
        for h in self.ext:
            if h.typeflag == b"L":
                return _cstr(h.data)
        if b"path" in self.paxd:
            return self.paxd[b"path"]
        name, prefix = _cstr(self.hdr.fields["name"]), _cstr(self.hdr.fields["prefix"])
        return prefix + b"/" + name if prefix else name

    @property
    def linkpath(self) -> bytes:
        return self.paxd.get(b"linkpath", _cstr(self.hdr.fields["linkname"]))

    def num(self, name: str) -> Optional[int]:
        return _num(self.hdr.fields[name])


@dataclass
class ParsedTar:
    members: List[Member] = field(default_factory=list)
    end: int = 0  # offset where the end-of-archive blocks start
    zero_blocks: int = 0
    total: int = 0
    problem: str = ""

    def by_path(self) -> Dict[bytes, Member]:
        return {m.path.rstrip(b"/"): m for m in self.members}

    def member(self, path: Name) -> Member:
        key = os.fsencode(path).rstrip(b"/")
        found = self.by_path().get(key)
        assert found is not None, (f"no entry {key!r} in the reference tar; it has "
                                   f"{sorted(self.by_path())[:50]}")
        return found


def parse_tar(data: bytes, total: Optional[int] = None) -> ParsedTar:
    """A raw view of a tar stream: every header's fields as bytes, PAX records in order."""
    out = ParsedTar(total=len(data) if total is None else total)
    pos, ext = 0, []  # type: int, List[Header]
    while pos + 512 <= len(data):
        blk = data[pos:pos + 512]
        if blk == b"\0" * 512:
            out.end = pos
            while pos + 512 <= len(data) and data[pos:pos + 512] == b"\0" * 512:
                out.zero_blocks += 1
                pos += 512
            if data[pos:].strip(b"\0"):
                out.problem = f"non-zero bytes after the end-of-archive blocks at {pos}"
            return out
        fields = {n: blk[a:b] for n, a, b in HEADER_FIELDS}
        tf = fields["typeflag"]
        size = _num(fields["size"]) or 0
        pax = dict(_pax_records(ext[-1].data)) if ext and ext[-1].typeflag == b"x" else {}
        if b"size" in pax:
            size = int(pax[b"size"])
        if tf in HEADER_ONLY:
            size = 0  # as Go's and GNU's readers: these types carry no data
        h = Header(pos, fields, pos + 512, data[pos + 512: pos + 512 + size], size)
        pos += 512 + (h.size + 511) // 512 * 512
        if tf in EXTENDED:
            ext.append(h)
            continue
        out.members.append(Member(len(out.members), ext, h))
        ext = []
    out.end = pos
    if pos < len(data) or total is not None:
        out.problem = out.problem or "stream cut short (no end-of-archive blocks seen)"
    return out


def _show(raw: bytes) -> str:
    body = raw.rstrip(b"\0")
    nuls = len(raw) - len(body)
    if len(body) > 70:
        body_s = repr(body[:40]) + f"...({len(body)} bytes)..." + repr(body[-20:])
    else:
        body_s = repr(body)
    return body_s + (f"+{nuls}NUL" if nuls else "")


def _locate(t: ParsedTar, off: int) -> str:
    for m in t.members:
        if not m.offset <= off < m.end:
            continue
        where = f"entry #{m.index} {m.path!r}"
        for h in [*m.ext, m.hdr]:
            kind = "header" if h is m.hdr else f"'{h.typeflag.decode()}' extended header"
            if h.offset <= off < h.offset + 512:
                rel = off - h.offset
                fname = next(n for n, a, b in HEADER_FIELDS if a <= rel < b)
                return f"{where}, {kind}, field {fname} (+{rel})"
            if h.data_offset <= off < h.data_offset + (h.size + 511) // 512 * 512:
                what = "records" if h is not m.hdr else "content/padding"
                return f"{where}, {kind} {what} at +{off - h.data_offset}"
    if off >= t.end:
        return f"end of archive (ends at {t.end}, {t.zero_blocks} zero blocks, {t.total} bytes)"
    return "between entries"


def _compare_members(a: Member, b: Member) -> List[Tuple[str, str, str]]:
    diffs = []
    ta, tb = [h.typeflag for h in a.ext], [h.typeflag for h in b.ext]
    if ta != tb:
        diffs.append(("extended headers", repr(ta), repr(tb)))
    for ha, hb in zip(a.ext, b.ext):
        if ha.typeflag != hb.typeflag:
            continue
        tag = ha.typeflag.decode()
        for n, _, _ in HEADER_FIELDS:
            if n != "chksum" and ha.fields[n] != hb.fields[n]:
                diffs.append((f"'{tag}'-header {n}", _show(ha.fields[n]), _show(hb.fields[n])))
    pa, pb = a.paxd, b.paxd
    for k in sorted(set(pa) | set(pb)):
        if pa.get(k) != pb.get(k):
            diffs.append((f"pax[{k.decode(errors='replace')}]",
                          "(absent)" if k not in pa else _show(pa[k]),
                          "(absent)" if k not in pb else _show(pb[k])))
    if pa == pb and a.pax != b.pax:
        diffs.append(("pax record order", repr([k for k, _ in a.pax]),
                      repr([k for k, _ in b.pax])))
    for n, _, _ in HEADER_FIELDS:
        if n != "chksum" and a.hdr.fields[n] != b.hdr.fields[n]:
            diffs.append((n, _show(a.hdr.fields[n]), _show(b.hdr.fields[n])))
    if a.hdr.data != b.hdr.data:
        diffs.append(("content", f"{len(a.hdr.data)} bytes "
                      f"sha256:{hashlib.sha256(a.hdr.data).hexdigest()[:16]}",
                      f"{len(b.hdr.data)} bytes "
                      f"sha256:{hashlib.sha256(b.hdr.data).hexdigest()[:16]}"))
    if not diffs and a.hdr.fields["chksum"] != b.hdr.fields["chksum"]:
        diffs.append(("chksum", _show(a.hdr.fields["chksum"]), _show(b.hdr.fields["chksum"])))
    return diffs


def explain(ours: bytes, ref: bytes, what: str, ours_total: Optional[int] = None,
            ref_total: Optional[int] = None, max_lines: int = 160) -> str:
    """A readable account of how two tar streams differ, for assertion messages."""
    po, pr = parse_tar(ours, ours_total), parse_tar(ref, ref_total)
    lines = [f"{what}: our Diff is not byte-identical to overlay2's (tarref)",
             f"  ours:     {po.total} bytes, {len(po.members)} entries"
             + (f" [{po.problem}]" if po.problem else ""),
             f"  overlay2: {pr.total} bytes, {len(pr.members)} entries"
             + (f" [{pr.problem}]" if pr.problem else "")]
    differing = (i for i, (x, y) in enumerate(zip(ours, ref)) if x != y)
    first = next(differing, min(len(ours), len(ref)))
    lines.append(f"  first differing byte at offset {first}:")
    lines.append(f"    ours:     {_locate(po, first)}")
    lines.append(f"    overlay2: {_locate(pr, first)}")
    if "field chksum" in _locate(pr, first):  # derived: show the first real difference too
        for off in differing:
            if "field chksum" not in _locate(pr, off):
                lines.append(f"  first differing byte outside checksums at offset {off}:")
                lines.append(f"    ours:     {_locate(po, off)}")
                lines.append(f"    overlay2: {_locate(pr, off)}")
                break
    sm = difflib.SequenceMatcher(a=[m.path for m in po.members],
                                 b=[m.path for m in pr.members], autojunk=False)
    counts: Dict[str, int] = {}
    detail: List[str] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            for a, b in zip(po.members[i1:i2], pr.members[j1:j2]):
                diffs = _compare_members(a, b)
                for name, _, _ in diffs:
                    counts[name] = counts.get(name, 0) + 1
                if diffs:
                    detail.append(f"  #{a.index}/#{b.index} {a.path!r} "
                                  f"(type {b.hdr.typeflag.decode()!r})")
                    for name, x, y in diffs:
                        detail.append(f"      {name:<22} ours {x:<36} overlay2 {y}")
            continue
        for m in po.members[i1:i2]:
            counts["only in ours"] = counts.get("only in ours", 0) + 1
            detail.append(f"  only in ours:     #{m.index} {m.path!r} "
                          f"(type {m.hdr.typeflag.decode()!r})")
        for m in pr.members[j1:j2]:
            counts["only in overlay2"] = counts.get("only in overlay2", 0) + 1
            detail.append(f"  only in overlay2: #{m.index} {m.path!r} "
                          f"(type {m.hdr.typeflag.decode()!r})")
    lines.append("  differing fields (number of entries): "
                 + (", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "none"))
    if po.zero_blocks != pr.zero_blocks or po.total - po.end != pr.total - pr.end:
        lines.append(f"  end of archive: ours {po.zero_blocks} zero blocks, "
                     f"{po.total - po.end} bytes after the last entry; overlay2 "
                     f"{pr.zero_blocks} zero blocks, {pr.total - pr.end} bytes")
    lines.extend(detail[:max_lines])
    if len(detail) > max_lines:
        lines.append(f"  ... {len(detail) - max_lines} more lines")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- trees


def _b(name: Name) -> bytes:
    return os.fsencode(name)


class Tree:
    """Fills an upper dir entry by entry. Owners, modes and xattrs are set in the order
    that keeps them (chown clears setuid and file capabilities), and every entry's mtime
    is applied at the very end, so nothing depends on when the test ran."""

    def __init__(self, root: str, outside: str, prefix: bytes = b"",
                 times: Optional[Dict[bytes, int]] = None) -> None:
        self.root = os.fsencode(root)
        self.outside = os.fsencode(outside)
        self.prefix = prefix
        self.times: Dict[bytes, int] = {} if times is None else times
        self._next = T

    def at(self, sub: Name) -> Tree:
        """The same tree, with names relative to directory `sub` (created if missing)."""
        rel = self.prefix + _b(sub)
        if not os.path.isdir(self.root + b"/" + rel):
            self.dir(sub)
        return Tree(self.root, self.outside, rel + b"/", self.times)

    def p(self, name: Name) -> bytes:
        return self.root + b"/" + self.prefix + _b(name)

    def _mtime(self, mtime: Optional[float], mtime_ns: Optional[int]) -> int:
        if mtime_ns is not None:
            return mtime_ns
        if mtime is not None:
            return int(mtime) * NS
        self._next += 1
        return self._next * NS

    def _parents(self, name: Name) -> None:
        head = os.path.dirname(_b(name))
        if head and not os.path.isdir(self.p(head)):
            self.dir(head)

    def _finish(self, path: bytes, uid: int, gid: int, mode: Optional[int],
                xattrs: Optional[Dict[str, bytes]], mtime_ns: int) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(path, mode)
        for k, v in (xattrs or {}).items():
            os.setxattr(path, k, v, follow_symlinks=False)
        self.times[path] = mtime_ns

    def dir(self, name: Name, mode: int = 0o755, uid: int = 0, gid: int = 0,
            mtime: Optional[float] = None, mtime_ns: Optional[int] = None,
            xattrs: Optional[Dict[str, bytes]] = None) -> bytes:
        self._parents(name)
        path = self.p(name)
        os.mkdir(path, 0o700)
        self._finish(path, uid, gid, mode, xattrs, self._mtime(mtime, mtime_ns))
        return path

    def file(self, name: Name, data: bytes = b"", mode: int = 0o644, uid: int = 0,
             gid: int = 0, mtime: Optional[float] = None, mtime_ns: Optional[int] = None,
             xattrs: Optional[Dict[str, bytes]] = None, size: Optional[int] = None,
             at: int = 0) -> bytes:
        """A regular file; with `size`, a sparse file of that size with `data` at `at`."""
        self._parents(name)
        path = self.p(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size is not None:
                os.ftruncate(fd, size)
            if data:
                os.pwrite(fd, data, at)
        finally:
            os.close(fd)
        self._finish(path, uid, gid, mode, xattrs, self._mtime(mtime, mtime_ns))
        return path

    def symlink(self, name: Name, target: Name, uid: int = 0, gid: int = 0,
                mtime: Optional[float] = None, mtime_ns: Optional[int] = None) -> bytes:
        self._parents(name)
        path = self.p(name)
        os.symlink(_b(target), path)
        self._finish(path, uid, gid, None, None, self._mtime(mtime, mtime_ns))
        return path

    def link(self, name: Name, existing: Name) -> bytes:
        """A hard link to an entry made before (it shares that entry's inode and mtime)."""
        self._parents(name)
        path = self.p(name)
        os.link(self.p(existing), path, follow_symlinks=False)
        return path

    def link_outside(self, name: Name) -> None:
        """One more link to the inode, outside the layer (nlink > 1, no other name in it)."""
        other = self.outside + b"/" + hashlib.sha256(self.p(name)).hexdigest().encode()
        os.link(self.p(name), other, follow_symlinks=False)

    def fifo(self, name: Name, mode: int = 0o644, uid: int = 0, gid: int = 0,
             mtime: Optional[float] = None) -> bytes:
        self._parents(name)
        path = self.p(name)
        os.mkfifo(path, 0o600)
        self._finish(path, uid, gid, mode, None, self._mtime(mtime, None))
        return path

    def device(self, name: Name, major: int, minor: int, *, block: bool = False,
               mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: Optional[float] = None,
               xattrs: Optional[Dict[str, bytes]] = None) -> bytes:
        self._parents(name)
        path = self.p(name)
        os.mknod(path, (stat.S_IFBLK if block else stat.S_IFCHR) | 0o600,
                 os.makedev(major, minor))
        self._finish(path, uid, gid, mode, xattrs, self._mtime(mtime, None))
        return path

    def whiteout(self, name: Name, uid: int = 0, gid: int = 0, mode: int = 0,
                 mtime: Optional[float] = None,
                 xattrs: Optional[Dict[str, bytes]] = None) -> bytes:
        """An overlay whiteout: a 0:0 character device (the kernel makes them mode 0)."""
        return self.device(name, 0, 0, mode=mode, uid=uid, gid=gid, mtime=mtime,
                           xattrs=xattrs)

    def opaque(self, name: Name, value: bytes = b"y") -> None:
        os.setxattr(self.p(name), "trusted.overlay.opaque", value)

    def socket(self, name: Name, mtime: Optional[float] = None) -> bytes:
        """A unix socket (bound in a short temporary dir: sun_path holds 108 bytes)."""
        self._parents(name)
        path = self.p(name)
        tmp = tempfile.mkdtemp(prefix="cgd-sock-", dir="/tmp")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(os.path.join(tmp, "s"))
            os.rename(os.path.join(tmp, "s"), path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.times[path] = self._mtime(mtime, None)
        return path

    def finish(self) -> None:
        for path, ns in self.times.items():
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
        for path, ns in self.times.items():  # nothing above may have moved a time
            assert os.lstat(path).st_mtime_ns == ns, (path, os.lstat(path).st_mtime_ns, ns)


# ---------------------------------------------------------------------------- ids


def _named_uid() -> int:
    for uid in (1, 2, 3, 8, 65534):
        try:
            pwd.getpwuid(uid)
            return uid
        except KeyError:
            continue
    raise AssertionError("no named non-root user in the user database")


def _nameless_id(db: Callable[[int], object]) -> int:
    for i in range(4242, 5242):
        try:
            db(i)
        except KeyError:
            return i
    raise AssertionError("no free id in 4242..5241")


def _group_without_user() -> int:
    uids = {p.pw_uid for p in pwd.getpwall()}
    for g in sorted(grp.getgrall(), key=lambda g: g.gr_gid):
        if g.gr_gid > 0 and g.gr_gid not in uids:
            return g.gr_gid
    raise AssertionError("every group id is also a user id here")


def _name_of(uid: int) -> bytes:
    try:
        return pwd.getpwuid(uid).pw_name.encode()
    except KeyError:
        return b""


# ---------------------------------------------------------------------------- capabilities

# struct vfs_cap_data: magic_etc (revision | effective flag), then permitted/inheritable
# pairs for the low and high 32 capabilities; revision 3 adds the namespace root uid.
CAP_V2_EFFECTIVE = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep
CAP_V2_PERMITTED = struct.pack("<IIIII", 0x02000000, (1 << 10) | (1 << 1), 1 << 1, 1, 0)
CAP_V3_ROOT_1000 = struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, 1000)
CAP_V3_ROOT_0 = struct.pack("<IIIIII", 0x03000000, 1 << 12, 0, 0, 0, 0)


# ---------------------------------------------------------------------------- cases

Check = Callable[[ParsedTar, str], None]


def _no_check(ref: ParsedTar, log: str) -> None:
    pass


def names_of_100_bytes(t: Tree) -> None:
    t.file("n" * 100, b"top-level name of 100 bytes\n")
    t.file("d" * 49 + "/" + "m" * 50, b"nested, 100 bytes in all\n")
    t.symlink("s" * 100, "n" * 100)
    t.link("x" * 100, "n" * 100)  # walked after "nnn...": a linkname of 100 bytes
    t.dir("D" * 99)  # 99 + "/" = 100
    t.file("e" * 99, b"99\n")


def check_names_of_100_bytes(ref: ParsedTar, log: str) -> None:
    assert not [m for m in ref.members if m.ext], "everything here fits a USTAR header"
    assert ref.member("n" * 100).hdr.fields["name"] == b"n" * 100
    assert ref.member("D" * 99).hdr.fields["name"] == b"D" * 99 + b"/"
    assert ref.member("x" * 100).hdr.fields["linkname"] == b"n" * 100


SPLIT_NAMES = (
    "a" * 50 + "/" + "b" * 50,  # 101
    "c" * 54 + "/" + "d" * 100,  # 155
    "e" * 20 + "/" + "f" * 20 + "/" + "g" * 80,  # 122, prefix with a slash in it
    "p" * 155 + "/" + "s" * 100,  # 256: the longest splittable name
    "q" * 100 + "/" + "r" * 100,  # 201
)


def names_splittable_into_ustar_prefix(t: Tree) -> None:
    for i, name in enumerate(SPLIT_NAMES):
        t.file(name, f"split {i}\n".encode(), mode=0o640)
    t.dir("x" * 60 + "/" + "y" * 60)  # a directory: 122 bytes with the slash
    t.symlink("u" * 60 + "/" + "v" * 60, "target")


def check_names_splittable(ref: ParsedTar, log: str) -> None:
    for name in (*SPLIT_NAMES, "x" * 60 + "/" + "y" * 60, "u" * 60 + "/" + "v" * 60):
        m = ref.member(name)
        assert not m.ext and m.hdr.fields["prefix"].strip(b"\0"), f"{name!r} is not split"
    assert ref.member("p" * 155 + "/" + "s" * 100).hdr.fields["prefix"] == b"p" * 155


UNSPLITTABLE = (
    "p" * 156 + "/" + "s" * 99,  # the prefix would be 156 bytes
    "a" * 10 + "/" + "b" * 101,  # the last component alone is over 100
    "f" * 101,  # no slash at all
    "F" * 255,  # NAME_MAX
    "/".join(c * 200 for c in "ABC"),  # 602 bytes
    "/".join(f"{i:03d}" + "z" * 196 for i in range(6)),  # 1199 bytes
)


def names_unsplittable(t: Tree) -> None:
    for i, name in enumerate(UNSPLITTABLE):
        t.file(name, f"long {i}\n".encode())
    t.link("L" * 120, UNSPLITTABLE[-1])  # a long name and a long linkname


def check_names_unsplittable(ref: ParsedTar, log: str) -> None:
    for name in UNSPLITTABLE:
        m = ref.member(name)
        assert m.paxd.get(b"path") == name.encode(), f"{name!r}: no PAX path record"
    m = ref.member("L" * 120)
    assert m.paxd[b"linkpath"] == UNSPLITTABLE[-1].encode() and b"path" in m.paxd


def long_directory_names(t: Tree) -> None:
    t.dir("D" * 99)  # 100 bytes with its slash: fits the name field
    t.dir("E" * 100)  # 101 with the slash, nothing to split at
    t.dir("F" * 101)
    t.dir("a/" + "X" * 98)  # 101 with the slash: prefix "a", name "XXX.../"
    t.dir("b/" + "Y" * 99)  # 102 with the slash: name would be 100 + slash
    # Over 100 and unsplittable, with "/" as the 100th byte: Go's writer turns that slash
    # into a NUL in the (truncated) name field.
    t.dir("x" * 99 + "/" + "y" * 120)
    t.file("x" * 99 + "/" + "y" * 120 + "/f", b"below\n")
    t.file("w" * 99 + "/" + "z" * 110, b"a file, slash at 100\n")


def check_long_directory_names(ref: ParsedTar, log: str) -> None:
    assert not ref.member("D" * 99).ext
    assert ref.member("E" * 100).paxd[b"path"] == b"E" * 100 + b"/"
    assert ref.member("a/" + "X" * 98).hdr.fields["prefix"].rstrip(b"\0") == b"a"
    m = ref.member("x" * 99 + "/" + "y" * 120)
    assert m.hdr.fields["name"] == b"x" * 99 + b"\0", _show(m.hdr.fields["name"])
    assert ref.member("w" * 99 + "/" + "z" * 110).hdr.fields["name"] == b"w" * 99 + b"\0"


def directory_named_100_chars(t: Tree) -> None:
    n = "N" * 100
    t.dir(n, mode=0o750)
    t.file(n + "/f", b"in a 100-char dir\n")
    t.dir(n + "/sub")
    t.file(n + "/sub/g", b"deeper\n")
    t.dir("a/" + n)
    t.file("a/" + n + "/h", b"nested 100-char dir\n")


def check_directory_named_100_chars(ref: ParsedTar, log: str) -> None:
    assert ref.member("N" * 100).paxd[b"path"] == b"N" * 100 + b"/"
    assert ref.member("N" * 100 + "/f").hdr.fields["prefix"].rstrip(b"\0") == b"N" * 100


INVALID_UTF8 = b"latin1-\xe9t\xe9-\xff"


def unicode_names(t: Tree) -> None:
    t.file("naïve-日本.txt", b"utf\n")
    t.dir("ünïcödé")
    t.file("ünïcödé/файл", b"cyrillic\n")
    t.file("日本", b"nothing ASCII in the name\n")
    t.file("emoji-😀", b"4-byte utf-8\n")
    t.file("ü" * 60, b"120 bytes of two-byte characters\n")
    t.file("ascii-dir/" + "é" * 40 + "/" + "k" * 30, b"non-ascii prefix\n")
    t.file(INVALID_UTF8, b"not utf-8 at all\n")
    # Go walks in byte order; U+FF01 (ef bc 81) sorts before a lone 0xf0 byte as bytes,
    # but after it as Python's surrogate-escaped str (U+DCF0).
    t.dir("order")
    t.file("order/\uff01", b"fullwidth !\n")
    t.file(b"order/\xf0", b"lone byte\n")
    t.file("new\nline = and \\", b"control characters\n")


def check_unicode_names(ref: ParsedTar, log: str) -> None:
    assert ref.member("日本").paxd[b"path"] == "日本".encode()
    assert ref.member("日本").hdr.fields["name"] == b"\0" * 100  # nothing ASCII left
    assert ref.member(INVALID_UTF8).paxd[b"path"] == INVALID_UTF8
    names = [m.path for m in ref.members if m.path.startswith(b"order/")][1:]
    assert names == ["order/\uff01".encode(), b"order/\xf0"], names


def symlinks(t: Tree) -> None:
    t.dir("target-dir")
    t.file("target-dir/file", b"x\n")
    t.symlink("rel", "target-dir/file")
    t.symlink("abs", "/etc/passwd")
    t.symlink("dangling", "/nonexistent/target")
    t.symlink("to-dir", "target-dir")
    t.symlink("dot", ".")
    t.symlink("t100", "t" * 100)
    t.symlink("t101", "t" * 101)
    t.symlink("t1000", "/".join(["seg" + "m" * 96] * 10))
    t.symlink("t4095", "x" * 4095)  # the longest target Linux allows
    t.symlink("uni", "ünïcödé/файл")
    t.symlink("raw", INVALID_UTF8)
    t.symlink("owned", "target-dir", uid=1234, gid=5678)
    t.symlink("l" * 130, "long name, short target")


def check_symlinks(ref: ParsedTar, log: str) -> None:
    assert not ref.member("t100").ext
    assert ref.member("t101").paxd[b"linkpath"] == b"t" * 101
    assert ref.member("t4095").paxd[b"linkpath"] == b"x" * 4095
    assert ref.member("uni").paxd[b"linkpath"] == "ünïcödé/файл".encode()
    assert ref.member("owned").num("uid") == 1234
    assert ref.member("rel").hdr.fields["mode"] == b"0120777\0"


def hard_links(t: Tree) -> None:
    t.file("a/b", b"first in walk order\n", mode=0o640, uid=1234, gid=5678)
    t.link("a-b", "a/b")  # sorts before "a/b" as a whole path, but is walked after it
    t.link("z" * 120, "a/b")
    t.file("suid", b"setuid\n", mode=0o4755)
    t.link("suid-link", "suid")
    t.file("empty", b"")
    t.link("empty-link", "empty")
    t.file("ünï", b"unicode first name\n")
    t.link("link-to-uni", "ünï")
    t.file("deep/" + "q" * 110 + "/first", b"long linkname\n")
    t.link("short", "deep/" + "q" * 110 + "/first")
    t.symlink("sym", "a/b")
    t.link("sym-link", "sym")  # a hard link to a symlink
    t.device("chr", 1, 3)
    t.link("chr-link", "chr")  # to a character device
    t.device("blk", 7, 200, block=True)
    t.link("blk-link", "blk")
    t.fifo("fifo")
    t.link("fifo-link", "fifo")
    t.file("lonely", b"nlink 2, the other link is outside the layer\n")
    t.link_outside("lonely")
    t.file("cap", b"capable\n", mode=0o755, xattrs={"security.capability": CAP_V2_EFFECTIVE})
    t.link("cap-link", "cap")


def check_hard_links(ref: ParsedTar, log: str) -> None:
    assert ref.member("a/b").hdr.typeflag == b"0"
    assert (ref.member("a-b").hdr.typeflag, ref.member("a-b").linkpath) == (b"1", b"a/b")
    assert ref.member("sym-link").hdr.typeflag == b"1"
    chr_link = ref.member("chr-link")
    assert chr_link.hdr.typeflag == b"1" and chr_link.num("devminor") == 3
    assert ref.member("lonely").hdr.typeflag == b"0" and ref.member("lonely").hdr.size > 0
    assert ref.member("short").paxd[b"linkpath"] == ("deep/" + "q" * 110 + "/first").encode()
    assert b"SCHILY.xattr.security.capability" in ref.member("cap-link").paxd


def xattrs(t: Tree) -> None:
    t.file("cap-v2", b"ep\n", mode=0o755, xattrs={"security.capability": CAP_V2_EFFECTIVE})
    t.file("cap-v2-noeff", b"p\n", mode=0o750, uid=1234, gid=5678,
           xattrs={"security.capability": CAP_V2_PERMITTED})
    t.file("cap-v3", b"v3\n", mode=0o755, xattrs={"security.capability": CAP_V3_ROOT_1000})
    got = os.getxattr(t.p("cap-v3"), "security.capability")
    assert len(got) == 24 and got[3] == 3, f"the kernel did not keep a v3 capability: {got!r}"
    t.file("cap-v3-root0", b"v3 root 0\n", xattrs={"security.capability": CAP_V3_ROOT_0})
    t.file("cap-suid", b"both\n", mode=0o4755,
           xattrs={"security.capability": CAP_V2_EFFECTIVE})
    t.file("c" * 130, b"long name and a capability\n",
           xattrs={"security.capability": CAP_V2_EFFECTIVE})
    t.file("user-xattrs", b"u\n", xattrs={"user.comment": b"ignored", "user.bin": b"\0\xff",
                                          "trusted.other": b"also ignored"})
    t.dir("dir-cap", xattrs={"security.capability": CAP_V2_EFFECTIVE,
                             "user.dir": b"ignored"})
    t.device("dev-cap", 1, 5, xattrs={"security.capability": CAP_V2_EFFECTIVE})
    t.dir("trusted-overlay", xattrs={"trusted.overlay.origin": b"\0\xfb",
                                     "trusted.overlay.redirect": b"/elsewhere",
                                     "trusted.overlay.impure": b"y"})


def check_xattrs(ref: ParsedTar, log: str) -> None:
    key = b"SCHILY.xattr.security.capability"
    assert ref.member("cap-v2").paxd[key] == CAP_V2_EFFECTIVE
    v3 = ref.member("cap-v3").paxd[key]
    assert v3 == CAP_V3_ROOT_1000[:3] + b"\x02" + CAP_V3_ROOT_1000[4:20], v3.hex()
    assert ref.member("user-xattrs").pax == []
    assert not ref.member("trusted-overlay").ext
    assert key in ref.member("dir-cap").paxd


def whiteouts(t: Tree) -> None:
    named = _named_uid()
    t.whiteout("gone")
    t.whiteout("gone-owned", uid=1234, gid=5678)
    t.whiteout("gone-named", uid=named, gid=named, mode=0o644)
    t.dir("sub", uid=42, gid=42)
    t.whiteout("sub/gone")
    t.whiteout("w" * 97)  # ".wh." makes it 101 bytes
    t.whiteout("sub/" + "v" * 120)
    t.whiteout("gone-ünï")
    t.whiteout("gone-cap", xattrs={"security.capability": CAP_V2_EFFECTIVE})
    # Linux >= 5.8 makes whiteouts as hard links to one shared whiteout inode (in the
    # work dir): every whiteout in a real upper dir has nlink > 1.
    t.whiteout("shared-1")
    t.link("shared-2", "shared-1")
    t.link("sub/shared-3", "shared-1")
    t.link_outside("shared-1")
    t.whiteout("workdir-shared")
    t.link_outside("workdir-shared")


def check_whiteouts(ref: ParsedTar, log: str) -> None:
    for name in ("gone", "gone-owned", "sub/.wh.gone", "shared-1"):
        m = ref.member(name if "/" in name else ".wh." + name)
        assert (m.hdr.typeflag, m.hdr.fields["mode"]) == (b"0", b"0000600\0"), name
    assert ref.member(".wh.gone-owned").num("uid") == 1234
    m2 = ref.member(".wh.shared-2")
    assert (m2.hdr.typeflag, m2.linkpath) == (b"0", b"shared-1")
    assert ref.member(".wh." + "w" * 97).paxd[b"path"] == b".wh." + b"w" * 97


def opaque_dirs(t: Tree) -> None:
    t.dir("plain-opq")
    t.opaque("plain-opq")
    t.file("plain-opq/kept", b"inside an opaque dir\n")
    t.file("plain-opq/.a", b"sorts before .wh..wh..opq\n")
    t.dir("setgid-opq", mode=0o2775, uid=1234, gid=5678)
    t.opaque("setgid-opq")
    t.dir("sticky-opq", mode=0o1777)
    t.opaque("sticky-opq")
    t.dir("all-bits-opq", mode=0o7750, uid=_named_uid(), gid=_named_uid())
    t.opaque("all-bits-opq")
    t.dir("big-owner-opq", uid=2**31, gid=4294967294, mtime=9_000_000_000)
    t.opaque("big-owner-opq")
    t.dir("o" * 95)  # the marker's name is over 100 bytes
    t.opaque("o" * 95)
    t.dir("öpq")
    t.opaque("öpq")
    t.dir("outer/inner")
    t.opaque("outer")
    t.opaque("outer/inner")
    t.whiteout("outer/gone")
    t.dir("not-opaque-x")
    t.opaque("not-opaque-x", b"x")
    t.dir("not-opaque-yy")
    t.opaque("not-opaque-yy", b"yy")
    t.dir("cap-opq", xattrs={"security.capability": CAP_V2_EFFECTIVE})
    t.opaque("cap-opq")


def check_opaque_dirs(ref: ParsedTar, log: str) -> None:
    names = [m.path for m in ref.members]
    i = names.index(b"plain-opq/")
    assert names[i + 1] == b"plain-opq/.wh..wh..opq", names[i:i + 3]
    m = ref.member("setgid-opq/.wh..wh..opq")
    assert (m.hdr.fields["mode"], m.num("uid"), m.num("mtime")) == (b"0000775\0", 1234, 0)
    assert ref.member("big-owner-opq/.wh..wh..opq").paxd[b"uid"] == str(2**31).encode()
    assert b"SCHILY.xattr.security.capability" not in ref.member("cap-opq/.wh..wh..opq").paxd
    assert not [n for n in names if n.startswith(b"not-opaque") and b".wh." in n]


def devices(t: Tree) -> None:
    t.device("null", 1, 3, mode=0o666)
    t.device("loop", 7, 200, block=True, mode=0o660, gid=6)
    t.device("max", 4095, 1048575)  # the largest major and minor numbers
    t.device("nvme", 259, 0, block=True, mode=0o600)
    t.device("char-0-1", 0, 1)  # not a whiteout: only 0:0 is
    t.device("block-0-0", 0, 0, block=True)  # not a whiteout: a block device
    t.device("suid-dev", 10, 10, mode=0o4620, uid=1234, gid=5678)


def check_devices(ref: ParsedTar, log: str) -> None:
    m = ref.member("max")
    assert (m.hdr.typeflag, m.num("devmajor"), m.num("devminor")) == (b"3", 4095, 1048575)
    assert ref.member("block-0-0").hdr.typeflag == b"4"
    assert ref.member("char-0-1").hdr.typeflag == b"3"
    assert ref.member("suid-dev").hdr.fields["mode"] == b"0024620\0"


def fifos_and_sockets(t: Tree) -> None:
    t.fifo("fifo", mode=0o644)
    t.fifo("fifo-odd", mode=0o2610, uid=1234, gid=5678)
    t.socket("m-socket")
    t.file("n-after-socket", b"written after the skipped socket\n")
    t.dir("d")
    t.socket("d/sock")


def check_fifos_and_sockets(ref: ParsedTar, log: str) -> None:
    assert "sockets not supported" in log, log
    names = {m.path for m in ref.members}
    assert b"m-socket" not in names and b"d/sock" not in names and b"d/" in names
    assert b"n-after-socket" in names
    assert ref.member("fifo").hdr.typeflag == b"6"


def sparse_and_empty_files(t: Tree) -> None:
    t.file("empty")
    t.file("empty-suid", mode=0o4755)
    t.file("sparse-1m", b"tail", size=1 << 20, at=(1 << 20) - 4)
    t.file("sparse-hole-first", b"data after a hole", size=3 << 20, at=2 << 20)
    t.file("sparse-all-hole", size=5 << 20)
    t.file("block-512", b"b" * 512)
    t.file("block-511", b"b" * 511)
    t.file("block-513", b"b" * 513)


def check_sparse_and_empty_files(ref: ParsedTar, log: str) -> None:
    assert ref.member("sparse-1m").hdr.size == 1 << 20
    assert ref.member("empty").hdr.size == 0
    assert not [m for m in ref.members if m.hdr.typeflag == b"S"]


def modes(t: Tree) -> None:
    for m in (0o4755, 0o2755, 0o1755, 0o6711, 0o7777, 0o0000, 0o4000, 0o0001):
        t.file(f"file-{m:04o}", f"{m:o}\n".encode(), mode=m)
    for m in (0o1777, 0o2775, 0o7755, 0o0000, 0o0700):
        t.dir(f"dir-{m:04o}", mode=m)
    t.file("dir-0700/kid", b"in a 0700 dir\n", mode=0o600)


def check_modes(ref: ParsedTar, log: str) -> None:
    assert ref.member("file-4755").hdr.fields["mode"] == b"0104755\0"
    assert ref.member("dir-1777").hdr.fields["mode"] == b"0041777\0"
    assert ref.member("file-0000").hdr.fields["mode"] == b"0100000\0"


def owners(t: Tree) -> None:
    named = _named_uid()
    nameless_uid = _nameless_id(pwd.getpwuid)
    nameless_gid = _nameless_id(grp.getgrgid)
    t.file("root", b"0:0\n")
    t.file("named", b"named\n", uid=named, gid=named)
    t.file("nameless", b"no name\n", uid=nameless_uid, gid=nameless_gid)
    t.file("group-only-named", b"\n", uid=nameless_uid, gid=_group_without_user())
    for i in (2097151, 2097152, 2**31, 4294967294):
        t.file(f"uid-{i}", b"big uid\n", uid=i, gid=0)
        t.file(f"gid-{i}", b"big gid\n", uid=0, gid=i)
    t.dir("dir-big", uid=2097152, gid=2097152)
    t.symlink("sym-big", "x", uid=4294967294, gid=4294967294)
    t.fifo("fifo-big", uid=2**31, gid=2**31)


def check_owners(ref: ParsedTar, log: str) -> None:
    assert ref.member("named").hdr.fields["uname"].rstrip(b"\0") == _name_of(_named_uid())
    assert ref.member("root").hdr.fields["uname"].rstrip(b"\0") == b"root"
    assert ref.member("nameless").hdr.fields["uname"] == b"\0" * 32
    assert ref.member("group-only-named").hdr.fields["gname"].strip(b"\0")
    assert ref.member("uid-2097151").hdr.fields["uid"] == b"7777777\0"
    assert ref.member("uid-2097152").paxd[b"uid"] == b"2097152"
    assert ref.member("gid-4294967294").paxd[b"gid"] == b"4294967294"


def mtimes(t: Tree) -> None:
    t.file("nanoseconds", b"\n", mtime_ns=T * NS + 999_999_999)
    t.file("zero", b"\n", mtime=0)
    t.file("one", b"\n", mtime=1)
    t.file("before-1970", b"\n", mtime=-1)
    t.file("before-1970-ns", b"\n", mtime_ns=-1_000_000_000 * NS - NS // 2)
    t.file("year-1901", b"\n", mtime=-(2**31))
    t.file("octal-max", b"\n", mtime=8**11 - 1)  # the last second 11 octal digits hold
    t.file("octal-over", b"\n", mtime=8**11)  # year 2242
    t.file("year-2400-ns", b"\n", mtime_ns=13_000_000_000 * NS + 123)
    t.dir("dir-before-1970", mtime=-86400 * 365)
    t.dir("dir-future", mtime=10_000_000_000)
    t.symlink("sym-future", "x", mtime=9_999_999_999)
    t.fifo("fifo-past", mtime=-5)


def check_mtimes(ref: ParsedTar, log: str) -> None:
    assert ref.member("nanoseconds").num("mtime") == T
    assert ref.member("octal-max").num("mtime") == 8**11 - 1
    assert ref.member("octal-over").paxd[b"mtime"] == str(8**11).encode()
    assert ref.member("before-1970").paxd[b"mtime"] == b"-1"
    assert ref.member("before-1970-ns").paxd[b"mtime"] == b"-1000000001"  # floored
    assert ref.member("octal-over").hdr.fields["mtime"] == b"00000000000\0"


def deep_paths(t: Tree) -> None:
    path = "/".join(f"level{i:02d}" for i in range(40))
    t.file(path + "/leaf", b"deep\n")
    t.symlink(path + "/up", "../" * 40)
    t.file("shallow", b"\n")


def check_deep_paths(ref: ParsedTar, log: str) -> None:
    assert len(ref.members) == 43
    assert any(b"path" in m.paxd for m in ref.members)


def walk_order(t: Tree) -> None:
    for name in ("a", "a-b", "a.b", "a0", "A", "_", "~", "a b", "aa"):
        t.file(name + "-f", b"\n")
    t.dir("a")
    t.file("a/b", b"\n")
    t.dir("a-")
    t.file("a-/c", b"\n")
    t.file("B", b"\n")
    t.file("b", b"\n")


def check_walk_order(ref: ParsedTar, log: str) -> None:
    # Walked directory by directory: "a/b" right after "a/", before "a b-f" (which a sort
    # of whole paths would put first: " " < "/").
    names = [m.path for m in ref.members]
    i = names.index(b"a/")
    assert names[i:i + 3] == [b"a/", b"a/b", b"a b-f"], names


CASES: Dict[str, Tuple[Callable[[Tree], None], Check]] = {
    "names_of_100_bytes": (names_of_100_bytes, check_names_of_100_bytes),
    "names_splittable_into_ustar_prefix": (names_splittable_into_ustar_prefix,
                                           check_names_splittable),
    "names_unsplittable": (names_unsplittable, check_names_unsplittable),
    "long_directory_names": (long_directory_names, check_long_directory_names),
    "directory_named_100_chars": (directory_named_100_chars, check_directory_named_100_chars),
    "unicode_names": (unicode_names, check_unicode_names),
    "symlinks": (symlinks, check_symlinks),
    "hard_links": (hard_links, check_hard_links),
    "xattrs": (xattrs, check_xattrs),
    "whiteouts": (whiteouts, check_whiteouts),
    "opaque_dirs": (opaque_dirs, check_opaque_dirs),
    "devices": (devices, check_devices),
    "fifos_and_sockets": (fifos_and_sockets, check_fifos_and_sockets),
    "sparse_and_empty_files": (sparse_and_empty_files, check_sparse_and_empty_files),
    "modes": (modes, check_modes),
    "owners": (owners, check_owners),
    "mtimes": (mtimes, check_mtimes),
    "deep_paths": (deep_paths, check_deep_paths),
    "walk_order": (walk_order, check_walk_order),
}


def everything(t: Tree) -> None:
    for name, (build, _) in CASES.items():
        build(t.at(name))


def check_everything(ref: ParsedTar, log: str) -> None:
    types = {m.hdr.typeflag for m in ref.members}
    assert {b"0", b"1", b"2", b"3", b"4", b"5", b"6"} <= types, types
    assert len({m.path.split(b"/")[0] for m in ref.members}) == len(CASES)
    assert "sockets not supported" in log


ALL_CASES = {**CASES, "everything_at_once": (everything, check_everything)}


# ---------------------------------------------------------------------------- tests


def _build(u: Upper, build: Callable[[Tree], None]) -> None:
    t = Tree(u.path, u.outside)
    build(t)
    t.finish()


def assert_identical(ours: bytes, ref: bytes, what: str) -> None:
    if ours != ref:
        pytest.fail(explain(ours, ref, what), pytrace=False)


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_native_diff_is_byte_identical_to_overlay2(case: str, upper: Upper, tarref: str):
    build, check = ALL_CASES[case]
    _build(upper, build)
    ref, log = reference_tar(tarref, upper.path)
    check(parse_tar(ref), log)  # the tree really has what this case is about
    assert_identical(our_diff(upper), ref, case)


def test_empty_upper_dir(upper: Upper, tarref: str):
    """Nothing changed: overlay2 streams just the end-of-archive blocks."""
    ref, _ = reference_tar(tarref, upper.path)
    assert ref == b"\0" * 1024
    assert_identical(our_diff(upper), ref, "empty upper dir")


def test_diff_is_the_same_every_time(upper: Upper):
    """Two Diffs of the same layer give the same bytes (a diff ID must be reproducible)."""
    _build(upper, everything)
    first = our_diff(upper)
    assert our_diff(upper) == first


class _Sink:
    """Keeps the head of a stream, its length and its sha256 (for streams too big to hold)."""

    def __init__(self, keep: int = 64 * 1024) -> None:
        self.keep = keep
        self.head = bytearray()
        self.length = 0
        self.sha = hashlib.sha256()

    def write(self, b) -> int:
        b = bytes(b)
        if len(self.head) < self.keep:
            self.head += b[: self.keep - len(self.head)]
        self.length += len(b)
        self.sha.update(b)
        return len(b)

    def flush(self) -> None:
        pass


def _chunks(f, size: int = 1 << 20) -> Iterator[bytes]:
    while True:
        b = f.read(size)
        if not b:
            return
        yield b


def test_file_of_8_gib_gets_a_pax_size_record(upper: Upper, tarref: str):
    """8 GiB is the first size the 11 octal digits of the size field cannot hold."""
    t = Tree(upper.path, upper.outside)
    t.file("big", b"end", size=8 * GIB, at=8 * GIB - 3)
    t.file("next", b"after the big one\n")
    t.finish()
    ref = _Sink()
    with subprocess.Popen([tarref, upper.path], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        for b in _chunks(p.stdout):
            ref.write(b)
    assert p.returncode == 0
    big = parse_tar(bytes(ref.head), ref.length).members[0]
    assert big.paxd[b"size"] == str(8 * GIB).encode()
    assert big.hdr.fields["size"] == b"00000000000\0"
    ours = _Sink()
    write_our_diff(upper.drv, upper.layer, upper.parent, ours)
    if (ours.length, ours.sha.digest()) != (ref.length, ref.sha.digest()):
        pytest.fail(explain(bytes(ours.head), bytes(ref.head), "8 GiB file (stream heads)",
                            ours.length, ref.length), pytrace=False)
