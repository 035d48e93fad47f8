"""Layers with real overlay mounts: moby's graphtest checks, Get/Put, Remove, Cleanup."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from layer_tools import (
    TarBuilder,
    make_layer,
    mounts_below,
    new_id,
    view_manifest,
)

from cvmfs_graphdriver import mounts
from cvmfs_graphdriver.errors import DriverError, NotFoundError
from cvmfs_graphdriver.layout import MAX_DEPTH, overlay_options

pytestmark = pytest.mark.root


def _mode_owner(path: str):
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _is_mounted(path: str) -> bool:
    return any(m.mount_point == os.path.realpath(path) for m in mounts.read_mountinfo())


# ---------------------------------------------------------------------------- graphtest


@pytest.mark.parametrize("rw", [False, True])
def test_empty_layer_is_an_empty_0755_root_owned_dir(drv, rw):
    layer = make_layer(drv, rw=rw)
    assert drv.exists(layer)
    d = drv.get(layer)
    assert os.path.isabs(d)
    assert _mode_owner(d) == (stat.S_IFDIR, 0o755, 0, 0)
    assert os.listdir(d) == []
    drv.put(layer)
    drv.remove(layer)
    assert not drv.exists(layer)
    assert not os.path.exists(os.path.join(drv.layout.home, layer))


def test_layers_are_0755_whatever_the_daemons_umask(drv):
    old = os.umask(0o077)
    try:
        layer = make_layer(drv, data=TarBuilder().file("implicit/parent/f", b"x").bytes())
    finally:
        os.umask(old)
    d = drv.get(layer)
    assert _mode_owner(d) == (stat.S_IFDIR, 0o755, 0, 0)
    # parents missing from the tar are made 0755, as moby's untar makes them
    assert _mode_owner(os.path.join(d, "implicit")) == (stat.S_IFDIR, 0o755, 0, 0)
    assert _mode_owner(os.path.join(d, "implicit", "parent")) == (stat.S_IFDIR, 0o755, 0, 0)


ODD_BASE = (
    TarBuilder()
    .dir("a subdir", mode=0o1705, uid=1, gid=2)
    .file("a file", b"Some data", mode=0o4222)
    .dir("sgid-dir", mode=0o2775, uid=3, gid=4)
    .file("sgid-dir/setgid-exe", b"#!/bin/sh\n", mode=0o2755, uid=5, gid=6)
    .file("setuid-owned-by-user", b"x", mode=0o4755, uid=1000, gid=1000)
    .dir("tmp", mode=0o1777)
    .bytes()
)


def _verify_odd_base(d: str) -> None:
    assert _mode_owner(os.path.join(d, "a subdir")) == (stat.S_IFDIR, 0o1705, 1, 2)
    assert _mode_owner(os.path.join(d, "a file")) == (stat.S_IFREG, 0o4222, 0, 0)
    assert _mode_owner(os.path.join(d, "sgid-dir")) == (stat.S_IFDIR, 0o2775, 3, 4)
    assert _mode_owner(os.path.join(d, "sgid-dir", "setgid-exe")) == (stat.S_IFREG, 0o2755, 5, 6)
    assert _mode_owner(os.path.join(d, "setuid-owned-by-user")) == (
        stat.S_IFREG, 0o4755, 1000, 1000)
    assert _mode_owner(os.path.join(d, "tmp")) == (stat.S_IFDIR, 0o1777, 0, 0)
    with open(os.path.join(d, "a file"), "rb") as f:
        assert f.read() == b"Some data"
    assert sorted(os.listdir(d)) == ["a file", "a subdir", "setuid-owned-by-user", "sgid-dir",
                                     "tmp"]


def test_base_layer_with_odd_modes_and_owners_survives_apply(drv):
    base = make_layer(drv, data=ODD_BASE)
    _verify_odd_base(drv.get(base))
    drv.put(base)


def test_base_layer_written_through_get_survives(drv):
    # graphtest's createBase: write into Get's directory with umask 0
    base = make_layer(drv, rw=True)
    old = os.umask(0)
    try:
        d = drv.get(base)
        os.mkdir(os.path.join(d, "a subdir"), 0o705)
        os.chmod(os.path.join(d, "a subdir"), 0o1705)
        os.lchown(os.path.join(d, "a subdir"), 1, 2)
        with open(os.path.join(d, "a file"), "wb") as f:
            f.write(b"Some data")
        os.chmod(os.path.join(d, "a file"), 0o4222)
        drv.put(base)
    finally:
        os.umask(old)
    d = drv.get(base)
    assert _mode_owner(os.path.join(d, "a subdir")) == (stat.S_IFDIR, 0o1705, 1, 2)
    assert _mode_owner(os.path.join(d, "a file")) == (stat.S_IFREG, 0o4222, 0, 0)
    assert len(os.listdir(d)) == 2
    drv.put(base)


def test_snapshot_child_sees_parents_files_and_writes_only_to_itself(drv):
    base = make_layer(drv, data=ODD_BASE)
    snap = make_layer(drv, base, rw=True)
    d = drv.get(snap)
    assert d == os.path.join(drv.layout.home, snap, "merged")
    assert _is_mounted(d)
    _verify_odd_base(d)

    with open(os.path.join(d, "new in snap"), "w") as f:
        f.write("snap")
    os.unlink(os.path.join(d, "a file"))
    drv.put(snap)
    assert not _is_mounted(d)

    base_dir = drv.get(base)
    assert os.path.exists(os.path.join(base_dir, "a file"))
    assert not os.path.exists(os.path.join(base_dir, "new in snap"))
    d = drv.get(snap)
    assert os.path.exists(os.path.join(d, "new in snap"))
    assert not os.path.exists(os.path.join(d, "a file"))
    drv.put(snap)


def test_committed_layer_view_is_read_only_and_rw_layer_is_writable(drv):
    base = make_layer(drv, data=TarBuilder().file("f", b"1").bytes())
    image = make_layer(drv, base, TarBuilder().file("g", b"2").bytes())
    container = make_layer(drv, image, rw=True)
    view = drv.get(image)
    with pytest.raises(OSError):
        open(os.path.join(view, "x"), "w").close()
    drv.put(image)
    view = drv.get(container)
    with open(os.path.join(view, "x"), "w") as f:
        f.write("ok")
    assert sorted(os.listdir(view)) == ["f", "g", "x"]
    drv.put(container)


def test_layer_becomes_read_only_only_when_a_child_is_created(drv):
    # overlay2 semantics (and moby's graphtest): a layer made by Create is writable when
    # mounted until a child is created on it; then its next mount is read-only.
    base = make_layer(drv, data=TarBuilder().file("f", b"1").bytes())
    layer = make_layer(drv, base, TarBuilder().file("g", b"2").bytes())
    view = drv.get(layer)
    with open(os.path.join(view, "written"), "w") as f:
        f.write("ok")
    drv.put(layer)
    make_layer(drv, layer, rw=True)
    view = drv.get(layer)
    with pytest.raises(OSError):
        open(os.path.join(view, "x"), "w").close()
    assert sorted(os.listdir(view)) == ["f", "g", "written"]
    drv.put(layer)


def test_deep_stack_of_128_lowers_reads_correctly_and_129_is_refused(new_driver, tmp_path):
    # A long home makes absolute lowerdir options exceed one page: the driver must mount
    # with home-relative short links (from a child process, never chdir in the daemon).
    home = str(tmp_path / ("long-data-root-" * 12) / ("and-longer-" * 20) / "cvmfs")
    drv = new_driver(home, sync_layers=False)
    layers = []
    parent = ""
    for i in range(MAX_DEPTH + 1):  # layer i has i lower layers
        data = TarBuilder().file(f"file-{i}", f"content {i}".encode()).file(
            "top", f"layer {i}".encode()).bytes()
        parent = make_layer(drv, parent, data)
        layers.append(parent)

    with pytest.raises(DriverError) as e:
        drv.create(new_id(), layers[-1], "", None, read_write=False)
    assert str(MAX_DEPTH) in str(e.value)

    for depth in (MAX_DEPTH - 1, MAX_DEPTH):
        layer = layers[depth]
        with open(os.path.join(home, layer, "lower")) as f:
            lower = f.read()
        assert lower.count(":") + 1 == depth
        assert overlay_options(drv.layout, layer, lower, readonly=True).relative_to == home
        view = drv.get(layer)
        assert _is_mounted(view)
        names = sorted(os.listdir(view))
        assert names == sorted(["top"] + [f"file-{i}" for i in range(depth + 1)])
        for i in range(depth + 1):
            with open(os.path.join(view, f"file-{i}"), "rb") as f:
                assert f.read() == f"content {i}".encode()
        with open(os.path.join(view, "top"), "rb") as f:
            assert f.read() == f"layer {depth}".encode()
        drv.put(layer)
        assert not _is_mounted(view)

    # a read-write layer over 127 image layers (the container case)
    container = make_layer(drv, layers[MAX_DEPTH - 1], rw=True)
    view = drv.get(container)
    with open(os.path.join(view, "file-0"), "rb") as f:
        assert f.read() == b"content 0"
    drv.put(container)


# ---------------------------------------------------------------------------- Get / Put


def test_get_put_are_reference_counted(drv):
    base = make_layer(drv, data=TarBuilder().file("f", b"hello").bytes())
    child = make_layer(drv, base, rw=True)
    first = drv.get(child)
    second = drv.get(child)
    assert first == second
    assert _is_mounted(first)
    drv.put(child)
    assert _is_mounted(first), "one Put of two Gets must keep the layer mounted"
    with open(os.path.join(first, "f"), "rb") as f:
        assert f.read() == b"hello"
    drv.put(child)
    assert not _is_mounted(first)
    assert mounts_below(drv.layout.home) == []


def test_base_layer_get_is_its_directory_and_needs_no_mount(drv):
    base = make_layer(drv, data=TarBuilder().file("f").bytes())
    d = drv.get(base)
    assert d == os.path.join(drv.layout.home, base, "diff")
    assert mounts_below(drv.layout.home) == []
    drv.put(base)
    assert os.path.exists(os.path.join(d, "f"))


def test_get_of_missing_or_incomplete_layers_is_an_error(drv):
    missing = new_id()
    with pytest.raises(NotFoundError) as e:
        drv.get(missing)
    assert missing in str(e.value)


def test_remove_unmounts_and_deletes_everything(drv):
    base = make_layer(drv, data=TarBuilder().file("f").bytes())
    child = make_layer(drv, base, rw=True)
    with open(os.path.join(drv.layout.home, child, "link")) as f:
        short = f.read()
    view = drv.get(child)
    assert _is_mounted(view)
    drv.remove(child)
    assert not _is_mounted(view)
    assert not drv.exists(child)
    assert not os.path.lexists(os.path.join(drv.layout.home, child))
    assert not os.path.lexists(os.path.join(drv.layout.home, "l", short))
    assert drv.exists(base)
    drv.remove(child)  # removing twice is fine (dockerd retries)


def test_cleanup_unmounts_everything_and_layers_stay(drv):
    base = make_layer(drv, data=TarBuilder().file("f", b"x").bytes())
    kids = [make_layer(drv, base, rw=True) for _ in range(3)]
    for k in kids:
        drv.get(k)
    drv.get(kids[0])
    assert len(mounts_below(drv.layout.home)) == 3
    drv.cleanup()
    assert mounts_below(drv.layout.home) == []
    for k in kids:
        assert drv.exists(k)
    view = drv.get(kids[1])  # usable again after a cleanup (dockerd restarted)
    with open(os.path.join(view, "f"), "rb") as f:
        assert f.read() == b"x"
    drv.put(kids[1])


# ---------------------------------------------------------------------------- create errors


def test_create_refuses_existing_layer_missing_parent_and_storage_opts(drv):
    base = make_layer(drv)
    with pytest.raises(DriverError) as e:
        drv.create(base, "", "", None, read_write=False)
    assert base in str(e.value) and "already exists" in str(e.value)

    missing = new_id()
    with pytest.raises(NotFoundError) as e:
        drv.create(new_id(), missing, "", None, read_write=False)
    assert missing in str(e.value)

    layer = new_id()
    with pytest.raises(DriverError) as e:
        drv.create(layer, "", "", {"size": "10G"}, read_write=True)
    assert "size" in str(e.value)
    assert not drv.exists(layer)
    assert os.listdir(drv.layout.staging) == []


def test_status_and_metadata(drv):
    base = make_layer(drv, data=TarBuilder().file("f").bytes())
    child = make_layer(drv, base, rw=True)
    rows = dict(drv.status())
    assert rows["Backing Filesystem"] == "extfs"
    assert rows["Layers"] == "2"
    assert rows["Driver Home"] == drv.layout.home
    drv.get(child)
    assert dict(drv.status())["Mounted Layers"] == "1"
    drv.put(child)
    meta = drv.metadata(child)
    assert meta["UpperDir"] == os.path.join(drv.layout.home, child, "diff")
    assert meta["MergedDir"] == os.path.join(drv.layout.home, child, "merged")
    assert meta["WorkDir"] == os.path.join(drv.layout.home, child, "work")
    assert meta["LowerDir"] == os.path.join(drv.layout.home, base, "diff")
    assert "LowerDir" not in drv.metadata(base)


def test_views_of_two_layers_from_the_same_parent_are_independent(drv):
    base = make_layer(drv, data=TarBuilder().file("shared", b"base").bytes())
    a = make_layer(drv, base, rw=True)
    b = make_layer(drv, base, rw=True)
    va, vb = drv.get(a), drv.get(b)
    with open(os.path.join(va, "shared"), "wb") as f:
        f.write(b"changed in a")
    assert view_manifest(vb)["/shared"][4] == b"base"
    drv.put(a)
    drv.put(b)


def test_concurrent_get_put_of_one_layer_balance_out(drv):
    base = make_layer(drv, data=TarBuilder().file("f", b"x").bytes())
    child = make_layer(drv, base, rw=True)
    errors = []

    def worker() -> None:
        try:
            for _ in range(20):
                view = drv.get(child)
                with open(os.path.join(view, "f"), "rb") as f:
                    assert f.read() == b"x"
                drv.put(child)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert mounts_below(drv.layout.home) == []
