"""A thin layer whose published files are not what they should be (issue 11, finding 8).

A FIFO, a device, a directory, a symlink or an oversized file where a published layer's
`.metadata/whiteouts.json` belongs is never opened as a file (a FIFO would block the
daemon's thread until someone writes to it), never followed, and the stack still mounts:
the markers are then found by listing the layer. That listing opens no file either, so
FIFOs among the layer's own files (an image's named pipe, a marker, CVMFS bookkeeping)
cannot block it. The CVMFS root is a plain directory tree, as in the thin unit tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import pytest
from layer_tools import TarBuilder, make_layer, mounts_below

from cvmfs_graphdriver import thin

pytestmark = pytest.mark.root

REPO = "test.repo"
HEX = hashlib.sha256(b"issue-11-finding-8").hexdigest()
HANG_SECONDS = 5  # "did not hang": a Get here takes well under a second


def did_not_hang(action: Callable[[], Any], fifos: List[str]) -> Tuple[Any, float]:
    """Run `action`; if it has not returned within HANG_SECONDS it is blocked opening one
    of `fifos`: release it (a writer's open lets a blocked reader's open return) and
    fail. Returns the action's result and how long it took."""
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = action()
        except BaseException as e:  # re-raised below, in the test's thread
            out["error"] = e

    start = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_SECONDS)
    if t.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading this one
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(30)
        pytest.fail(f"hung: still blocked after {HANG_SECONDS} s, released by opening "
                    "the FIFOs for writing")
    if "error" in out:
        raise out["error"]
    return out["value"], time.monotonic() - start


@pytest.fixture
def published(tmp_path) -> Tuple[str, str, List[str]]:
    """A CVMFS root with one published layer (DUCC's layout), FIFOs among its files:
    the root, the layer's directory, and those FIFOs."""
    root = tmp_path / "cvmfs"
    layer = root / REPO / thin.layer_path(HEX)
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "hostname").write_text("thin\n")
    (layer.parent / thin.METADATA_DIR).mkdir()
    fifos = [str(layer / "pipe"),  # the image's own named pipe
             str(layer / "etc" / ".wh.gone"),  # a marker, published as a FIFO
             str(layer / ".cvmfscatalog")]  # CVMFS bookkeeping, as a FIFO
    for fifo in fifos:
        os.mkfifo(fifo)
    return str(root), str(layer), fifos


def thin_tar() -> bytes:
    desc = {"version": "1.0", "layers": [
        {"digest": f"sha256:{HEX}", "url": f"cvmfs://{REPO}/{thin.layer_path(HEX)}"}]}
    return TarBuilder().file(thin.DESCRIPTOR_NAME, json.dumps(desc).encode()).bytes()


def put_in_place(kind: str, path: str, root: str) -> None:
    """Something that is not a usable regular file at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        # to a well-formed index inside the repository (so the path check passes): read
        # through the link, it would hide etc/hostname and show the marker's FIFO
        target = os.path.join(root, REPO, "index.json")
        with open(target, "w") as f:
            json.dump({"markers": ["etc/hostname"], "deleted": [], "opaque": []}, f)
        os.symlink(target, path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))  # as /dev/null
    elif kind == "oversized":
        with open(path, "wb") as f:
            f.truncate(thin.MAX_METADATA_BYTES + 1)  # sparse: never read, fstat says
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "device", "oversized"])
def test_get_of_a_thin_child_does_not_hang_on_a_whiteout_index_that_is_not_a_file(
        new_driver, published, tmp_path, kind, caplog):
    root, layer, fifos = published
    index = os.path.join(os.path.dirname(layer), thin.METADATA_DIR, thin.WHITEOUT_INDEX)
    put_in_place(kind, index, root)
    drv = new_driver(cvmfs_root=root, repositories=(REPO,))
    tid = make_layer(drv, data=thin_tar())
    cid = make_layer(drv, parent=tid, rw=True)

    view, seconds = did_not_hang(lambda: drv.get(cid), fifos + [index])
    try:
        # the markers were found by listing the layer: the FIFO marker and the
        # bookkeeping FIFO are hidden, the image's own FIFO is there, as a FIFO
        assert sorted(os.listdir(view)) == ["etc", "pipe"]
        assert stat.S_ISFIFO(os.lstat(os.path.join(view, "pipe")).st_mode)
        assert os.listdir(os.path.join(view, "etc")) == ["hostname"]
    finally:
        drv.put(cid)
    assert mounts_below(str(tmp_path)) == []
    assert f"ignoring {thin.METADATA_DIR}/{thin.WHITEOUT_INDEX} of cvmfs://{REPO}/" \
        in caplog.text
    print(f"{kind}: Get returned in {seconds:.3f} s")


def test_get_reads_a_whiteout_index_that_is_a_regular_file(new_driver, published, tmp_path):
    """The same layer with a usable index: it is read, not the listing (the index here
    hides etc/hostname, which the listing would not)."""
    root, layer, fifos = published
    index = os.path.join(os.path.dirname(layer), thin.METADATA_DIR, thin.WHITEOUT_INDEX)
    with open(index, "w") as f:
        json.dump({"markers": ["etc/hostname", "etc/.wh.gone"], "deleted": ["etc/gone"],
                   "opaque": []}, f)
    drv = new_driver(cvmfs_root=root, repositories=(REPO,))
    cid = make_layer(drv, parent=make_layer(drv, data=thin_tar()), rw=True)
    view, _ = did_not_hang(lambda: drv.get(cid), fifos)
    try:
        assert os.listdir(os.path.join(view, "etc")) == []
    finally:
        drv.put(cid)
    assert mounts_below(str(tmp_path)) == []
