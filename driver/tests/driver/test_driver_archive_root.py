"""archive functions on plain directories where root is needed: whiteout devices, trusted
xattrs, owners and capabilities."""

from __future__ import annotations

import io
import os
import stat
import struct

import pytest
from layer_tools import read_tar

from cvmfs_graphdriver import archive, changes, whiteouts
from cvmfs_graphdriver.changes import CHANGE_MODIFY

pytestmark = pytest.mark.root

CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
CAP2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _write(path: str, data: bytes = b"") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _whiteout(path: str, uid: int = 0) -> None:
    os.mknod(path, stat.S_IFCHR, 0)
    os.chown(path, uid, uid)


def _pairs(changes):
    out = [(c.path, c.kind) for c in changes]
    assert len(out) == len(set(out)), f"duplicate changes: {out}"
    return set(out)


def test_changes_dirs_sees_owner_and_capability_changes(as_root, tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    for root in (old, new):
        for name in ("owner", "cap", "same"):
            _write(f"{root}/{name}", b"x")
            os.utime(f"{root}/{name}", ns=(10**18, 10**18))
        os.setxattr(f"{root}/cap", "security.capability", CAP)
        os.setxattr(f"{root}/same", "security.capability", CAP)
    os.chown(f"{new}/owner", 1000, 1000)
    os.setxattr(f"{new}/cap", "security.capability", CAP2)
    assert _pairs(changes.changes_dirs(new, old)) == {("/owner", CHANGE_MODIFY),
                                                       ("/cap", CHANGE_MODIFY)}


def test_native_diff_tar_of_an_upper_dir(as_root, tmp_path):
    upper = str(tmp_path / "upper")
    _write(f"{upper}/dir/file", b"data")
    os.setxattr(f"{upper}/dir", "trusted.overlay.opaque", b"y")
    os.chmod(f"{upper}/dir", 0o750)
    _whiteout(f"{upper}/dir/deleted", uid=7)
    _write(f"{upper}/ping", b"p")
    os.setxattr(f"{upper}/ping", "security.capability", CAP)
    os.setxattr(f"{upper}/ping", "user.not-exported", b"u")  # moby exports only the capability
    os.link(f"{upper}/ping", f"{upper}/ping2")
    out = io.BytesIO()
    archive.write_layer_tar(out, upper)
    data = out.getvalue()
    entries = read_tar(data)
    assert set(entries) == {"dir", "dir/.wh..wh..opq", "dir/.wh.deleted", "dir/file", "ping",
                            "ping2"}
    marker, content = entries["dir/.wh.deleted"]
    assert marker.isreg() and content == b"" and marker.uid == 7
    assert entries["dir/.wh..wh..opq"][0].isreg()
    assert stat.S_IMODE(entries["dir"][0].mode) == 0o750
    ping = entries["ping"][0]
    assert ping.pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape") == CAP
    assert "SCHILY.xattr.user.not-exported" not in ping.pax_headers
    assert entries["ping2"][0].islnk() and entries["ping2"][0].linkname == "ping"
    # Go's archive/tar ends a stream with two zero blocks and nothing else
    assert len(data) % 512 == 0 and data.endswith(b"\0" * 1024)


def test_native_diff_of_an_empty_layer_is_an_empty_tar(as_root, tmp_path):
    out = io.BytesIO()
    archive.write_layer_tar(out, str(tmp_path))
    assert out.getvalue() == b"\0" * 1024  # what dockerd hashes as the empty layer


def test_apply_then_native_diff_round_trips(as_root, tmp_path):
    src = str(tmp_path / "src")
    _write(f"{src}/a/b", b"b")
    os.symlink("a/b", f"{src}/link")
    os.mkfifo(f"{src}/fifo")
    _whiteout(f"{src}/wh")
    os.setxattr(f"{src}/a", "trusted.overlay.opaque", b"y")
    out = io.BytesIO()
    archive.write_layer_tar(out, src)
    dst = str(tmp_path / "dst")
    os.mkdir(dst)
    archive.apply_tar(io.BytesIO(out.getvalue()), dst, whiteouts.OverlayUpper())
    st = os.lstat(f"{dst}/wh")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(f"{dst}/a", "trusted.overlay.opaque") == b"y"
    assert os.readlink(f"{dst}/link") == "a/b"
    assert stat.S_ISFIFO(os.lstat(f"{dst}/fifo").st_mode)
    assert sorted(os.listdir(dst)) == ["a", "fifo", "link", "wh"]
