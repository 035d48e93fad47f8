"""ApplyDiff, Diff, Changes and DiffSize on real layers: metadata survives, whiteouts are
converted both ways, and Diff applied elsewhere reproduces the layer (moby's graphtest)."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import struct

import pytest
from layer_tools import (
    T0,
    TarBuilder,
    apply,
    make_layer,
    new_id,
    read_tar,
    view_manifest,
    xattr,
)

from cvmfs_graphdriver import fdtree
from cvmfs_graphdriver.changes import CHANGE_ADD, CHANGE_DELETE, CHANGE_MODIFY
from cvmfs_graphdriver.errors import DriverError

pytestmark = pytest.mark.root

# a valid VFS_CAP_REVISION_2 capability set: cap_net_bind_service permitted + effective
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
NS = 1_000_000_000


def _diff(drv, layer: str, parent: str) -> bytes:
    out = io.BytesIO()
    drv.diff(layer, parent, out)
    return out.getvalue()


def _pairs(changes):
    out = [(c.path, c.kind) for c in changes]
    assert len(out) == len(set(out)), f"duplicate changes: {out}"
    return set(out)


# ---------------------------------------------------------------------------- apply


def test_apply_preserves_types_owners_modes_links_xattrs_and_mtimes(drv):
    data = (
        TarBuilder()
        .dir("d", mode=0o750, uid=1000, gid=1001, mtime=T0 + 1)
        .file("d/f", b"payload", mode=0o640, uid=1001, gid=1002, mtime=T0 + 5)
        .hardlink("d/hl", "d/f", mode=0o640, uid=1001, gid=1002, mtime=T0 + 5)
        .symlink("sym", "d/f", uid=1003, gid=1004, mtime=T0 + 2)
        .symlink("dangling", "/nonexistent/target")
        .fifo("fifo", mode=0o620, mtime=T0 + 3)
        .device("null", 1, 3, mode=0o666, mtime=T0 + 4)
        .device("loop", 7, 0, block=True, mode=0o660, gid=6)
        .file("ping", b"\x7fELF", mode=0o755,
              xattrs={"security.capability": CAP_NET_BIND, "user.plain": b"value",
                      "user.binary": b"\xff\x00\xfe"})
        .file("suid", b"s", mode=0o4755, uid=0, gid=0)
        .file("old", b"o", mtime=0)
        .file("precise", b"p", pax={"mtime": "1600000000.123456789"})
        .bytes()
    )
    layer = make_layer(drv)
    size = apply(drv, layer, "", data)
    root = drv.get(layer)

    st = os.lstat(os.path.join(root, "d"))
    assert (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
        True, 0o750, 1000, 1001)
    assert st.st_mtime_ns == (T0 + 1) * NS  # set after its children were written

    f = os.lstat(os.path.join(root, "d", "f"))
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_size) == (0o640, 1001, 1002, 7)
    assert f.st_mtime_ns == (T0 + 5) * NS  # a hard link entry's own time applies to the inode
    hl = os.lstat(os.path.join(root, "d", "hl"))
    assert (hl.st_ino, hl.st_nlink) == (f.st_ino, 2)

    s = os.lstat(os.path.join(root, "sym"))
    assert stat.S_ISLNK(s.st_mode) and (s.st_uid, s.st_gid) == (1003, 1004)
    assert os.readlink(os.path.join(root, "sym")) == "d/f"
    assert s.st_mtime_ns == (T0 + 2) * NS
    assert os.readlink(os.path.join(root, "dangling")) == "/nonexistent/target"

    fifo = os.lstat(os.path.join(root, "fifo"))
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert fifo.st_mtime_ns == (T0 + 3) * NS
    null = os.lstat(os.path.join(root, "null"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666 and null.st_mtime_ns == (T0 + 4) * NS
    loop = os.lstat(os.path.join(root, "loop"))
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0)
    assert (stat.S_IMODE(loop.st_mode), loop.st_gid) == (0o660, 6)

    ping = os.path.join(root, "ping")
    assert xattr(ping, "security.capability") == CAP_NET_BIND
    assert xattr(ping, "user.plain") == b"value"
    assert xattr(ping, "user.binary") == b"\xff\x00\xfe"
    assert stat.S_IMODE(os.lstat(os.path.join(root, "suid")).st_mode) == 0o4755
    assert os.lstat(os.path.join(root, "old")).st_mtime_ns == 0
    assert os.lstat(os.path.join(root, "precise")).st_mtime_ns == 1_600_000_000_123_456_789

    assert size == fdtree.directory_size(root) == 7 + len("d/f") + len(
        "/nonexistent/target") + 4 + 1 + 1 + 1
    assert drv.exists(layer)
    assert not os.path.exists(os.path.join(drv.layout.home, layer, ".applying"))
    drv.put(layer)


def test_later_entries_replace_earlier_ones(drv):
    data = (
        TarBuilder()
        .file("x", b"first")
        .file("x", b"second")
        .dir("was-file")
        .file("was-dir/inner", b"i")
        .file("was-dir", b"now a file")
        .bytes()
    )
    layer = make_layer(drv, data=data)
    m = view_manifest(drv.get(layer))
    assert m["/x"][4] == b"second"
    assert m["/was-dir"][4] == b"now a file"
    assert "/was-dir/inner" not in m


def test_corrupt_or_truncated_tar_is_refused_and_layer_stays_incomplete(drv):
    good = TarBuilder().file("big", os.urandom(50_000)).bytes()
    for bad in (b"this is not a tar" * 100, good[:20_000]):
        layer = make_layer(drv)
        with pytest.raises(DriverError) as e:
            apply(drv, layer, "", bad)
        assert layer in str(e.value)
        assert not drv.exists(layer)
        with pytest.raises(DriverError) as e:
            drv.get(layer)
        assert "incomplete" in str(e.value)


# ---------------------------------------------------------------------------- whiteouts


def _whiteout_stack(drv):
    base = make_layer(drv, data=(
        TarBuilder()
        .file("x", b"x")
        .file("keep", b"k")
        .dir("dir")
        .file("dir/a", b"a")
        .file("dir/b", b"b")
        .dir("gone-dir")
        .file("gone-dir/deep", b"d")
        .bytes()))
    child_tar = (
        TarBuilder()
        .file(".wh.x", uid=0)
        .file(".wh.gone-dir")
        .dir("dir", mode=0o755)
        .file("dir/.wh..wh..opq")
        .file("dir/new", b"n")
        .file(".wh..wh.plnk")  # AUFS metadata: skipped
        .bytes()
    )
    child = make_layer(drv, base, child_tar)
    return base, child


def test_whiteout_markers_become_overlay_whiteouts(drv):
    base, child = _whiteout_stack(drv)
    diff = os.path.join(drv.layout.home, child, "diff")
    for name in ("x", "gone-dir"):
        st = os.lstat(os.path.join(diff, name))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    assert xattr(os.path.join(diff, "dir"), "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(diff)) == ["dir", "gone-dir", "x"]  # no marker files written
    assert os.listdir(os.path.join(diff, "dir")) == ["new"]

    m = view_manifest(drv.get(child))
    assert set(m) == {"/keep", "/dir", "/dir/new"}
    drv.put(child)


def test_diff_turns_overlay_whiteouts_back_into_markers(drv):
    base, child = _whiteout_stack(drv)
    entries = read_tar(_diff(drv, child, base))
    assert set(entries) == {".wh.x", ".wh.gone-dir", "dir", "dir/.wh..wh..opq", "dir/new"}
    for marker in (".wh.x", ".wh.gone-dir", "dir/.wh..wh..opq"):
        member, content = entries[marker]
        assert member.isreg() and content == b""
    assert entries["dir/new"][1] == b"n"
    assert not any(m.ischr() for m, _ in entries.values())


def test_changes_report_whiteouts_as_deletions(drv):
    base, child = _whiteout_stack(drv)
    # compared on the mounted trees, as overlay2 does: what the opaque dir hides is deleted
    assert _pairs(drv.changes(child, base)) == {
        ("/x", CHANGE_DELETE),
        ("/gone-dir", CHANGE_DELETE),
        ("/dir", CHANGE_MODIFY),
        ("/dir/a", CHANGE_DELETE),
        ("/dir/b", CHANGE_DELETE),
        ("/dir/new", CHANGE_ADD),
    }


# ---------------------------------------------------------------------------- Diff -> ApplyDiff


def _content(seed: int) -> bytes:
    return random.Random(seed).randbytes(64)


def _add_many_files(root: str, count: int, seed: int) -> None:
    for i in range(count):
        d = os.path.join(root, f"directory-{i // 10}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file-{i}"), "wb") as f:
            f.write(_content(seed + i))


def _check_many_files(root: str, count: int, seed: int) -> None:
    for i in range(count):
        with open(os.path.join(root, f"directory-{i // 10}", f"file-{i}"), "rb") as f:
            assert f.read() == _content(seed + i), f"file-{i}"


def test_diff_applied_onto_a_new_layer_reproduces_the_layer(drv):
    count = 30
    base = make_layer(drv, rw=True)
    root = drv.get(base)
    _add_many_files(root, count, 3)
    with open(os.path.join(root, "file-remove.txt"), "wb") as f:
        f.write(b"This file should get removed in upper!")
    os.makedirs(os.path.join(root, "var", "lib", "sub"))
    with open(os.path.join(root, "var", "lib", "sub", "f"), "w") as f:
        f.write("in a deleted directory")
    os.makedirs(os.path.join(root, "opq"))
    for name in ("old1", "old2"):
        with open(os.path.join(root, "opq", name), "w") as f:
            f.write(name)
    drv.put(base)

    upper = make_layer(drv, base, rw=True)
    root = drv.get(upper)
    _add_many_files(root, count, 6)
    os.unlink(os.path.join(root, "file-remove.txt"))
    shutil.rmtree(os.path.join(root, "var", "lib"))
    shutil.rmtree(os.path.join(root, "opq"))
    os.mkdir(os.path.join(root, "opq"))  # re-created over a whiteout: an opaque dir
    with open(os.path.join(root, "opq", "fresh"), "wb") as f:
        f.write(b"fresh!")
    os.symlink("directory-0/file-0", os.path.join(root, "link"))
    os.link(os.path.join(root, "directory-0", "file-1"), os.path.join(root, "hard"))
    upper_view = view_manifest(root)
    drv.put(upper)
    upper_diff = os.path.join(drv.layout.home, upper, "diff")
    assert xattr(os.path.join(upper_diff, "opq"), "trusted.overlay.opaque") == b"y"

    diff_size = drv.diff_size(upper, "")  # graphtest's call: a naive size of the whole view
    assert drv.diff_size(upper, base) == fdtree.directory_size(upper_diff)

    target = make_layer(drv, base)
    _check_many_files(drv.get(target), count, 3)
    drv.put(target)

    tar = _diff(drv, upper, base)
    entries = read_tar(tar)
    assert ".wh.file-remove.txt" in entries
    assert "var/.wh.lib" in entries
    assert "opq/.wh..wh..opq" in entries
    assert entries["hard"][0].islnk() or entries["directory-0/file-1"][0].islnk()

    applied = apply(drv, target, base, tar)
    assert applied == diff_size
    assert applied == drv.diff_size(upper, base)

    view = drv.get(target)
    _check_many_files(view, count, 6)
    assert not os.path.lexists(os.path.join(view, "file-remove.txt"))
    assert not os.path.lexists(os.path.join(view, "var", "lib"))
    assert os.path.isdir(os.path.join(view, "var"))
    assert os.listdir(os.path.join(view, "opq")) == ["fresh"]
    assert view_manifest(view) == upper_view
    a = os.lstat(os.path.join(view, "hard"))
    b = os.lstat(os.path.join(view, "directory-0", "file-1"))
    assert a.st_ino == b.st_ino
    drv.put(target)


def test_naive_diff_between_non_adjacent_layers_applies_to_the_same_view(drv):
    base = make_layer(drv, data=(
        TarBuilder()
        .file("keep", b"keep")
        .file("modify", b"before")
        .file("delete", b"delete")
        .dir("deldir")
        .file("deldir/f", b"f")
        .file("ping", b"p", xattrs={"security.capability": CAP_NET_BIND})
        .bytes()))
    mid = make_layer(drv, base, TarBuilder().file("modify", b"after, longer")
                     .file(".wh.delete").file("added-in-mid", b"m").bytes())
    top = make_layer(drv, mid, TarBuilder().file(".wh.deldir").file("dir/new", b"new")
                     .file("ping", b"p2", xattrs={"security.capability": CAP_NET_BIND})
                     .bytes())

    assert _pairs(drv.changes(top, base)) == {
        ("/modify", CHANGE_MODIFY),
        ("/delete", CHANGE_DELETE),
        ("/added-in-mid", CHANGE_ADD),
        ("/deldir", CHANGE_DELETE),
        ("/dir", CHANGE_ADD),
        ("/dir/new", CHANGE_ADD),
        ("/ping", CHANGE_MODIFY),
    }
    tar = _diff(drv, top, base)
    entries = read_tar(tar)
    assert entries[".wh.delete"][0].isreg() and entries[".wh.deldir"][0].isreg()
    assert entries["ping"][0].pax_headers.get("SCHILY.xattr.security.capability", "").encode(
        "utf-8", "surrogateescape") == CAP_NET_BIND

    target = make_layer(drv, base)
    size = apply(drv, target, base, tar)
    assert size == drv.diff_size(top, base)
    expected = view_manifest(drv.get(top))
    drv.put(top)
    view = drv.get(target)
    assert view_manifest(view) == expected
    assert xattr(os.path.join(view, "ping"), "security.capability") == CAP_NET_BIND
    drv.put(target)
    assert _pairs(drv.changes(target, base)) >= {("/delete", CHANGE_DELETE),
                                                 ("/deldir", CHANGE_DELETE)}


def test_diff_of_a_base_layer_is_the_whole_layer(drv):
    base = make_layer(drv, data=TarBuilder().dir("etc").file("etc/hostname", b"h")
                      .symlink("lnk", "etc").bytes())
    entries = read_tar(_diff(drv, base, ""))
    assert set(entries) == {"etc", "etc/hostname", "lnk"}
    assert entries["lnk"][0].linkname == "etc"
    assert _pairs(drv.changes(base, "")) == {("/etc", CHANGE_ADD), ("/etc/hostname", CHANGE_ADD),
                                              ("/lnk", CHANGE_ADD)}
    assert drv.diff_size(base, "") == 1 + len("etc")


# ---------------------------------------------------------------------------- Changes


def test_changes_are_the_exact_add_modify_delete_sets(drv):
    count = 20
    base = make_layer(drv, rw=True)
    _add_many_files(drv.get(base), count, 3)
    drv.put(base)
    upper = make_layer(drv, base, rw=True)
    root = drv.get(upper)
    expected = {("/directory-0", CHANGE_MODIFY), ("/directory-1", CHANGE_MODIFY)}
    for i in range(count):
        d = f"/directory-{i // 10}"
        if i % 3 == 0:
            with open(root + f"{d}/file-{i}", "wb") as f:
                f.write(_content(600 + i))
            expected.add((f"{d}/file-{i}", CHANGE_MODIFY))
        elif i % 3 == 1:
            with open(root + f"{d}/file-6-{i}", "wb") as f:
                f.write(_content(600 + i))
            expected.add((f"{d}/file-6-{i}", CHANGE_ADD))
        else:
            os.unlink(root + f"{d}/file-{i}")
            expected.add((f"{d}/file-{i}", CHANGE_DELETE))
    os.chmod(root + "/directory-1/file-13", 0o600)  # a mode change is a modification
    expected.add(("/directory-1/file-13", CHANGE_MODIFY))
    drv.put(upper)

    assert _pairs(drv.changes(upper, base)) == expected
    # the naive path (parent given as a non-direct layer: nothing) sees every file as added
    naive = _pairs(drv.changes(upper, ""))
    assert all(kind == CHANGE_ADD for _, kind in naive)
    assert ("/directory-0/file-6-1", CHANGE_ADD) in naive
    assert ("/directory-0/file-2", CHANGE_ADD) not in naive


def test_diff_size_counts_what_the_layer_adds(drv):
    base = make_layer(drv, data=TarBuilder().file("a", b"x" * 1000).bytes())
    child = make_layer(drv, base, TarBuilder().file("b", b"y" * 300).file(".wh.a")
                       .file("c", b"z" * 20).bytes())
    assert drv.diff_size(child, base) == 320
    assert drv.diff_size(child, "") == 320  # whole view: a is deleted
    assert drv.diff_size(base, "") == 1000


def test_diff_changes_and_size_of_unknown_layers_are_errors(drv):
    missing = new_id()
    for call in (lambda: _diff(drv, missing, ""), lambda: drv.changes(missing, ""),
                 lambda: drv.diff_size(missing, "")):
        with pytest.raises(DriverError) as e:
            call()
        assert missing in str(e.value)


def test_apply_diff_against_another_parent_applies_onto_the_mounted_layer(drv):
    """overlay2 falls back to moby's naive ApplyDiff when the parent given is not the
    layer's own (graphtest's DriverBenchDiffApplyN passes ""): the tar lands in the
    mounted view, markers delete, and the size is the sum of the header sizes."""
    base = make_layer(drv, data=TarBuilder().file("keep", b"k").file("gone", b"g")
                      .dir("d").file("d/old", b"o").bytes())
    layer = make_layer(drv, base, rw=True)
    data = (TarBuilder().file("new", b"12345").file(".wh.gone", b"")
            .dir("d").file("d/.wh..wh..opq", b"").file("d/fresh", b"fff").bytes())
    assert drv.apply_diff(layer, None, io.BytesIO(data)) == 8
    view = drv.get(layer)
    try:
        assert sorted(os.listdir(view)) == ["d", "keep", "new"]
        assert os.listdir(os.path.join(view, "d")) == ["fresh"]
    finally:
        drv.put(layer)
    # the base layer itself is untouched; the layer's own diff holds overlay whiteouts
    assert sorted(os.listdir(drv.layout.diff(base))) == ["d", "gone", "keep"]
    st = os.lstat(os.path.join(drv.layout.diff(layer), "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_the_root_entry_of_a_tar_changes_nothing(drv):
    """moby's Unpack skips "." (overlay2's ApplyDiff): a layer tar made as a user, whose
    "./" is owned by that user with mode 0700, must not hand the layer root to them."""
    layer = make_layer(drv, data=TarBuilder().dir(".", mode=0o700, uid=1000, gid=1000)
                       .file("f", b"x").bytes())
    st = os.stat(drv.layout.diff(layer))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
