"""`docker diff` from the container's upper dir (changes.changes_in_upper, issue 10)
against moby's comparison of the two whole mounted trees (changes_dirs, what overlay2's
Changes does): for random changes made through a running container's root - new,
rewritten, truncated, chmod/chown-ed and deleted files, deleted and re-created
directories (opaque), symlinks, hard links, capabilities, devices - both give the very
same list, in the same order."""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest
from layer_tools import TarBuilder, make_layer, new_id

from cvmfs_graphdriver import changes

pytestmark = pytest.mark.root

CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def _base_tar(rng: random.Random) -> bytes:
    tb = TarBuilder()
    for d in range(6):
        tb.dir(f"d{d}")
        for s in range(3):
            tb.dir(f"d{d}/s{s}")
            for f in range(5):
                tb.file(f"d{d}/s{s}/f{f}", bytes([rng.randrange(256)]) * rng.randrange(1, 200))
        tb.symlink(f"d{d}/link", f"s0/f{d % 5}")
    return tb.bytes()


def _mutate(root: str, rng: random.Random) -> None:
    """A dozen random changes through the mounted view."""
    def some_dir() -> str:
        return os.path.join(root, f"d{rng.randrange(7)}", *([f"s{rng.randrange(4)}"]
                                                           if rng.random() < 0.7 else []))
    for _ in range(12):
        d = some_dir()
        f = os.path.join(d, f"f{rng.randrange(7)}")
        op = rng.randrange(12)
        try:
            if op == 0:
                os.makedirs(d, exist_ok=True)
                with open(f, "wb") as out:
                    out.write(os.urandom(rng.randrange(300)))
            elif op == 1:
                with open(f, "ab") as out:
                    out.write(b"more")
            elif op == 2:
                os.chmod(f, 0o600 + rng.randrange(0o100))
            elif op == 3:
                os.lchown(f, 1000 + rng.randrange(3), 1000)
            elif op == 4:
                os.unlink(f)
            elif op == 5:
                shutil.rmtree(d)
            elif op == 6:
                shutil.rmtree(d)
                os.makedirs(d)  # over a whiteout: opaque
                with open(os.path.join(d, "again"), "wb") as out:
                    out.write(b"x")
            elif op == 7:
                os.symlink("target", os.path.join(d, f"sym{rng.randrange(3)}"))
            elif op == 8:
                os.link(f, os.path.join(d, f"hard{rng.randrange(3)}"))
            elif op == 9:
                os.setxattr(f, "security.capability", CAP)
            elif op == 10:
                os.mknod(os.path.join(d, "fifo"), 0o600 | 0o010000)
            else:
                os.utime(f, ns=(0, rng.randrange(1, 10**18)))
        except OSError:
            pass  # the path was not there (removed by an earlier change): no change


@pytest.mark.parametrize("seed", range(12))
def test_changes_from_the_upper_dir_are_moby_changes_of_the_whole_trees(drv, seed):
    rng = random.Random(seed)
    assert drv.native_diff, "this kernel's overlay must allow native diff for this test"
    base = make_layer(drv, "", _base_tar(rng))
    image = make_layer(drv, base, TarBuilder().file("d0/s0/f0", b"top").bytes())
    init, container = new_id() + "-init", new_id()
    make_layer(drv, image, layer=init, rw=True)
    make_layer(drv, init, layer=container, rw=True)
    view = drv.get(container)
    try:
        _mutate(view, rng)
        pview = drv.get(init)
        try:
            whole = changes.changes_dirs(view, pview)
        finally:
            drv.put(init)
        got = drv.changes(container, init)
    finally:
        drv.put(container)
    assert whole, "the random changes changed nothing: the comparison would be vacuous"
    assert got == whole
