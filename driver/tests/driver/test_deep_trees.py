"""Trees as deep as the kernel allows (issue 11, finding 1): a container's `mkdir -p` of
a path far deeper than Python's recursion limit and longer than PATH_MAX, and a pulled
layer with the same depth. Every walk of the driver (apply, size, changes, diff, removal,
start-up recovery) must handle it; one bad layer must never stop the home from working.
"""

from __future__ import annotations

import os
import sys

import pytest
from layer_tools import TarBuilder, apply, make_layer, new_id, read_tar

from cvmfs_graphdriver import fdtree
from cvmfs_graphdriver.config import Config
from cvmfs_graphdriver.driver import Driver

NAME = "d" * 20  # 1100 levels of it: ~23 KB of path, far over PATH_MAX (4096)
DEPTH = 1100
assert sys.getrecursionlimit() < DEPTH


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path):
    """Torn down after the drivers (set up first): pytest's own clean-up of tmp_path
    recurses (shutil.rmtree), so the test removes its deep trees itself."""
    yield
    for name in os.listdir(tmp_path):
        fdtree.remove_tree(str(tmp_path / name))


def mkdir_deep(root: str, depth: int = DEPTH) -> None:
    """mkdir -p of root/NAME/NAME/... one level at a time through descriptors (the
    path is too long for any path-based call), a file at the bottom."""
    fd = os.open(root, fdtree.DIR_FLAGS)
    try:
        for _ in range(depth):
            os.mkdir(NAME, 0o755, dir_fd=fd)
            nfd = os.open(NAME, fdtree.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"at the bottom")
    finally:
        os.close(fd)


def deep_tar(depth: int = DEPTH) -> bytes:
    t = TarBuilder()
    path = ""
    for _ in range(depth):
        path = f"{path}{NAME}/"
        t.dir(path.rstrip("/"))
    t.file(path + "bottom", b"at the bottom")
    return t.bytes()


def test_a_container_layer_as_deep_as_the_kernel_allows(new_driver, tmp_path):
    drv = new_driver()
    base = make_layer(drv, data=TarBuilder().file("etc/hostname", b"base").bytes())
    rw = new_id()
    drv.create(rw, base, "", None, read_write=True)
    view = drv.get(rw)
    try:
        mkdir_deep(view)
    finally:
        drv.put(rw)
    changes = drv.changes(rw, base)
    assert len(changes) == DEPTH + 1 and changes[-1].path.endswith("/bottom")
    assert drv.diff_size(rw, base) == len(b"at the bottom")
    out = tmp_path / "diff.tar"
    with open(out, "wb") as f:
        drv.diff(rw, base, f)
    entries = read_tar(out.read_bytes())
    assert len(entries) == DEPTH + 1
    # a layer made of it (docker commit) applies, has its size, and goes
    top = new_id()
    drv.create(top, base, "", None, read_write=False)
    assert apply(drv, top, base, out.read_bytes()) == len(b"at the bottom")
    drv.remove(rw)
    drv.remove(top)
    drv.wait_for_removals()
    assert sorted(os.listdir(drv.layout.staging)) == []


def test_a_pulled_layer_as_deep_as_the_kernel_allows(new_driver, tmp_path):
    drv = new_driver()
    layer = make_layer(drv, data=deep_tar())
    assert drv.diff_size(layer, "") == len(b"at the bottom")
    assert len(drv.changes(layer, "")) == DEPTH + 1
    drv.remove(layer)


def test_start_up_recovery_is_not_stopped_by_a_deep_leftover(new_driver, tmp_path):
    """A removal interrupted half way leaves a deep tree in .staging; an ApplyDiff
    interrupted leaves one in a layer marked as applying: the next start clears both."""
    home = str(tmp_path / "home")
    drv = new_driver(home)
    keep = make_layer(drv, data=TarBuilder().file("f", b"kept").bytes())
    half = os.path.join(drv.layout.staging, "removing-leftover")
    os.mkdir(half)
    mkdir_deep(half)
    partial = new_id()
    drv.create(partial, "", "", None, read_write=False)
    mkdir_deep(drv.layout.diff(partial))
    with open(drv.layout.applying_marker(partial), "w"):
        pass
    again = Driver(Config())
    again.init(home, None, None, None)
    try:
        assert os.listdir(again.layout.staging) == []
        assert not again.exists(partial)
        assert again.exists(keep)
    finally:
        again.cleanup()


def test_start_up_goes_on_past_a_layer_it_cannot_put_right(new_driver, tmp_path,
                                                          monkeypatch):
    """Whatever stops the clearing of one interrupted layer (here a removal that fails),
    the others are recovered and Init succeeds: dockerd must be able to start."""
    home = str(tmp_path / "home")
    drv = new_driver(home)
    keep = make_layer(drv, data=TarBuilder().file("f", b"kept").bytes())
    stuck, cleared = new_id(), new_id()
    for layer in (stuck, cleared):
        drv.create(layer, "", "", None, read_write=False)
        with open(drv.layout.applying_marker(layer), "w"):
            pass
    real_remove = fdtree.remove_tree

    def failing(path: str) -> None:
        if stuck in path:
            raise RuntimeError("cannot remove this one")
        real_remove(path)

    monkeypatch.setattr(fdtree, "remove_tree", failing)
    again = Driver(Config())
    again.init(home, None, None, None)
    try:
        assert again.exists(keep)
        assert not again.exists(stuck) and not again.exists(cleared)
        assert not os.path.exists(drv.layout.dir(cleared))
    finally:
        again.cleanup()
