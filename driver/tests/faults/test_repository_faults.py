"""A repository that vanishes, cannot be read or hangs under a thin image or a lazily
pulled layer (issue 11, faults b). The repository is a bind mount of a published tree
under the driver's cvmfs_root; the faults are real for root: the bind mount lazily
unmounted, the layer removed, a FUSE mount over it that refuses root (EACCES: mounted
for another uid without allow_other) or that never answers (its INIT is never read).

Each time: a clear error within a bounded time, naming the repository; the daemon
answers a regular image meanwhile; nothing mounted, nothing created, nothing lost; once
the repository is back, the same image mounts; no lookup thread or descriptor left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Callable, Dict, Iterator, NamedTuple

import pytest
from faultkit import (
    HANG_SECONDS,
    FuseMount,
    bytes_lost,
    contents,
    detach_below,
    did_not_hang,
    fds,
    settle,
)
from layer_tools import PluginClient, PluginError, TarBuilder, make_layer, mounts_below

from cvmfs_graphdriver import thin
from cvmfs_graphdriver.snapshotter import remote
from cvmfs_graphdriver.snapshotter.errdefs import FailedPrecondition, NotFound
from cvmfs_graphdriver.snapshotter.metastore import KIND_ACTIVE
from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

pytestmark = pytest.mark.root

REPO = "test.repo"
HEX = hashlib.sha256(b"issue-11-repository-faults").hexdigest()
BOUND = 2.0  # thin.LOOKUP_SECONDS here (10 s in the daemon)

# fault -> what the error must say (besides the repository's name)
FAULTS = {
    "unmounted": "is missing",
    "layer-removed": "is missing",
    "repository-eacces": "cannot be read (Permission denied)",
    "layer-eacces": "Permission denied",
    "repository-hangs": "did not answer within",
    "layer-hangs": "did not answer within",
}


class Repo(NamedTuple):
    root: str  # the driver's cvmfs_root
    mount: str  # <root>/<REPO>, a bind mount of `published`
    published: str
    layer: str  # the layer's directory as the driver sees it


@pytest.fixture
def repo(as_root) -> Iterator[Repo]:
    """A published layer bind-mounted as <cvmfs_root>/test.repo (outside tmp_path: the
    driver fixtures find no mount of theirs there); unmounted afterwards."""
    base = tempfile.mkdtemp(prefix="cgd-repo-", dir="/tmp")
    root, published = os.path.join(base, "cvmfs"), os.path.join(base, "published")
    layer = os.path.join(published, thin.layer_path(HEX))
    os.makedirs(os.path.join(layer, "etc"))
    with open(os.path.join(layer, "etc", "hostname"), "w") as f:
        f.write("thin\n")
    mount = os.path.join(root, REPO)
    os.makedirs(mount)
    subprocess.run(["mount", "--bind", published, mount], check=True)
    try:
        yield Repo(root, mount, published, os.path.join(mount, thin.layer_path(HEX)))
    finally:
        detach_below(root)
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def inject(fault: str, r: Repo, fuse: Callable[[str, str], FuseMount]) -> Callable[[], None]:
    """Inject `fault`; returns what puts the repository back."""
    if fault == "unmounted":
        subprocess.run(["umount", "-l", r.mount], check=True)
        return lambda: subprocess.run(["mount", "--bind", r.published, r.mount], check=True)
    if fault == "layer-removed":
        aside = r.layer + ".aside"
        os.rename(os.path.join(r.published, thin.layer_path(HEX)), aside.replace(
            r.mount, r.published))
        return lambda: os.rename(aside.replace(r.mount, r.published),
                                 os.path.join(r.published, thin.layer_path(HEX)))
    kind = "eacces" if fault.endswith("eacces") else "hang"
    m = fuse(r.mount if fault.startswith("repository") else r.layer, kind)
    return m.close


def lookup_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "cvmfs-lookup")


def thin_tar() -> bytes:
    desc = {"version": "1.0", "layers": [{"digest": f"sha256:{HEX}",
                                          "url": f"cvmfs://{REPO}/{thin.layer_path(HEX)}"}]}
    return TarBuilder().file(thin.DESCRIPTOR_NAME, json.dumps(desc).encode()).bytes()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_graph_driver_thin_image_on_a_failing_repository(repo, fuse, new_driver, serve,
                                                          fault, monkeypatch, tally):
    monkeypatch.setattr(thin, "LOOKUP_SECONDS", BOUND)
    d = new_driver(cvmfs_root=repo.root, repositories=(REPO,))
    thin_layer = make_layer(d, data=thin_tar())
    regular = make_layer(d, data=TarBuilder().file("etc/regular", os.urandom(4096)).bytes())
    container = make_layer(d, thin_layer, rw=True)
    other = make_layer(d, regular, rw=True)
    kept = {la: contents(d.layout.diff(la)) for la in (thin_layer, regular)}
    sock = serve(d)
    faulty, client = PluginClient(sock), PluginClient(sock)
    fds_before = fds()

    put_back = inject(fault, repo, fuse)
    answered: Dict[str, float] = {}

    def regular_meanwhile() -> None:  # the daemon answers a regular image meanwhile
        time.sleep(0.2)
        start = time.monotonic()
        view = client.call("GraphDriver.Get", {"ID": other, "MountLabel": ""})["Dir"]
        with open(os.path.join(view, "etc", "regular"), "rb") as f:
            assert len(f.read()) == 4096
        client.call("GraphDriver.Put", {"ID": other})
        answered["regular"] = time.monotonic() - start

    side = threading.Thread(target=regular_meanwhile, daemon=True)
    side.start()
    try:
        error, took = did_not_hang(
            lambda: faulty.call("GraphDriver.Get", {"ID": container, "MountLabel": ""}),
            HANG_SECONDS)
        side.join(HANG_SECONDS)
    finally:
        put_back()
    assert isinstance(error, PluginError), error
    assert REPO in error.message and FAULTS[fault] in error.message, error.message
    assert container in error.message or "thin layer" in error.message, error.message
    assert "regular" in answered and answered["regular"] < 5
    if fault.endswith("hangs"):
        assert BOUND - 0.5 < took < BOUND + 5
    assert not os.path.ismount(d.layout.merged(container))

    # The repository is back: the same image mounts, as it would have.
    view = faulty.call("GraphDriver.Get", {"ID": container, "MountLabel": ""})["Dir"]
    with open(os.path.join(view, "etc", "hostname")) as f:
        assert f.read() == "thin\n"
    faulty.call("GraphDriver.Put", {"ID": container})
    faulty.close()
    client.close()

    lost = sum(bytes_lost(before, d.layout.diff(la)) for la, before in kept.items())
    leaked_threads = settle(lookup_threads, 0)
    leaked_fds = len(set(settle(fds, fds_before)) - set(fds_before))
    leaked_mounts = len(mounts_below(d.layout.home))
    leaks = leaked_threads + leaked_fds + leaked_mounts
    tally.lost(lost)
    tally.leaks(leaks)
    tally.fault(survived=lost == 0 and leaks == 0)
    assert (lost, leaked_threads, leaked_fds, leaked_mounts) == (0, 0, 0, 0)


@pytest.fixture
def snapshotter(tmp_path, as_root) -> Iterator[OverlaySnapshotter]:
    sn = OverlaySnapshotter(str(tmp_path / "sn"))
    yield sn
    sn.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_snapshotter_remote_snapshot_on_a_failing_repository(repo, fuse, snapshotter, fault,
                                                             monkeypatch, tally):
    """Prepare on a remote snapshot (a container of a lazily pulled or thin image) and a
    lazy pull itself, with the repository failing."""
    monkeypatch.setattr(thin, "LOOKUP_SECONDS", BOUND)
    monkeypatch.setattr(remote, "LOOKUP_SECONDS", BOUND)
    sn = snapshotter
    remote.install(sn, repo.root, [REPO], trust_unrecorded=True)
    layer = thin.ThinLayer(REPO, thin.layer_path(HEX), HEX)
    sn.commit_remote("remote", "", remote.CvmfsLayers.record([layer]))
    sn.prepare("regular-k", "")
    with open(os.path.join(sn.layout.fs(_sid(sn, "regular-k")), "f"), "wb") as f:
        f.write(b"regular")
    sn.commit("regular", "regular-k")
    fds_before = fds()

    put_back = inject(fault, repo, fuse)
    meanwhile: Dict[str, object] = {}

    def regular_meanwhile() -> None:
        time.sleep(0.2)
        start = time.monotonic()
        meanwhile["mounts"] = sn.prepare("regular-c", "regular")
        meanwhile["took"] = time.monotonic() - start

    side = threading.Thread(target=regular_meanwhile, daemon=True)
    side.start()
    try:
        error, took = did_not_hang(lambda: sn.prepare("c", "remote"), HANG_SECONDS)
        # a lazy pull of the layer: not found in time (or at all), so an ordinary
        # snapshot containerd downloads into, never an error or a hang
        lazy, lazy_took = did_not_hang(lambda: sn.prepare("lazy", "", {
            remote.TARGET_REF_LABEL: "sha256:" + "1" * 64,
            remote.LAYER_DIGEST_LABEL: f"sha256:{HEX}"}), HANG_SECONDS)
        side.join(HANG_SECONDS)
    finally:
        put_back()
    assert isinstance(error, FailedPrecondition), error
    assert REPO in str(error) and FAULTS[fault] in str(error), error
    assert isinstance(lazy, list), lazy
    assert sn.stat("lazy").kind == KIND_ACTIVE
    with pytest.raises(NotFound):
        sn.stat("c")  # nothing was created
    assert "mounts" in meanwhile and meanwhile["took"] < 5  # type: ignore[operator]
    if fault.endswith("hangs"):
        assert BOUND - 0.5 < took < BOUND + 5 and lazy_took < BOUND + 5
    assert os.listdir(sn.layout.staging) == []

    assert sn.prepare("c", "remote")  # the repository is back
    with open(os.path.join(sn.layout.fs(_sid(sn, "regular")), "f"), "rb") as f:
        lost = 0 if f.read() == b"regular" else len(b"regular")
    leaked_threads = settle(lookup_threads, 0)
    leaked_fds = len(set(settle(fds, fds_before)) - set(fds_before))
    leaks = leaked_threads + leaked_fds
    tally.lost(lost)
    tally.leaks(leaks)
    tally.fault(survived=lost == 0 and leaks == 0)
    assert (lost, leaked_threads, leaked_fds) == (0, 0, 0)


def _sid(sn: OverlaySnapshotter, key: str) -> str:
    with sn.ms.transaction() as tx:
        return tx.get_info(key)[0]
