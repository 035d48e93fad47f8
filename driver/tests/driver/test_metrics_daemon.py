"""The graph driver's metrics from a real daemon (`cvmfs-graphdriver serve` as systemd runs
it, spoken to over its socket as dockerd does): the textfile node_exporter reads and the
root-only metrics socket, both parsed with Prometheus' own parser."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from typing import Iterator, List

import pytest
from harness import DriverProcess, wait_until
from layer_tools import PluginClient, PluginError, TarBuilder, mounts_below, new_id
from metrics_tools import Sample, http_get, parse, value

from cvmfs_graphdriver import mounts, thin

pytestmark = pytest.mark.root

PLUGIN_NAME = os.environ.get("CVMFS_GRAPHDRIVER_TEST_PLUGIN", "cvmfs") + "metrics"
REPO, GONE = "test.repo", "gone.repo"  # GONE: allowed, but nothing is mounted there
HEX = hashlib.sha256(b"metrics").hexdigest()
TEXTFILE = "cvmfs_graphdriver.prom"

class Daemon:
    def __init__(self, proc: DriverProcess, textfile_dir: str, metrics_socket: str) -> None:
        self.proc = proc
        self.textfile_dir = textfile_dir
        self.metrics_socket = metrics_socket

    def textfile(self) -> List[Sample]:
        with open(os.path.join(self.textfile_dir, TEXTFILE), encoding="utf-8") as f:
            return parse(f.read())

    def wait_for(self, name: str, want: float, **labels: str) -> List[Sample]:
        """The textfile's samples once `name{labels}` is `want` (it is rewritten every
        second); fails with what it showed last."""
        deadline = time.monotonic() + 15
        while True:
            samples = self.textfile()
            got = value(samples, name, **labels)
            if got == want:
                return samples
            if time.monotonic() > deadline:
                pytest.fail(f"{name}{labels} is {got} in the textfile, expected {want}")
            time.sleep(0.2)


@pytest.fixture
def daemon(as_root, tmp_path) -> Iterator[Daemon]:
    root = tmp_path / "cvmfs"
    layer = root / REPO / thin.layer_path(HEX)
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "hostname").write_text("thin\n")
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    sockdir = tempfile.mkdtemp(prefix="cgdm-", dir="/tmp")  # unix socket paths are short
    metrics_socket = os.path.join(sockdir, "metrics.sock")
    proc = DriverProcess(PLUGIN_NAME, str(tmp_path / "driver"), [
        "--cvmfs-root", str(root), "--repositories", f"{REPO},{GONE}",
        "--metrics-textfile-dir", str(textfile_dir), "--metrics-socket", metrics_socket,
        "--metrics-interval", "1"]).start()
    try:
        yield Daemon(proc, str(textfile_dir), metrics_socket)
    finally:
        proc.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
        leaked = mounts_below(str(tmp_path))
        for point in leaked:
            mounts.unmount(point)
        assert leaked == [], f"mounts left behind: {leaked}"


def thin_tar(repo: str) -> bytes:
    desc = {"version": "1.0", "layers": [
        {"digest": f"sha256:{HEX}", "url": f"cvmfs://{repo}/{thin.layer_path(HEX)}"}]}
    return TarBuilder().file(thin.DESCRIPTOR_NAME, json.dumps(desc).encode()).bytes()


def create(c: PluginClient, parent: str = "", rw: bool = False) -> str:
    layer = new_id()
    c.call("GraphDriver.CreateReadWrite" if rw else "GraphDriver.Create",
           {"ID": layer, "Parent": parent, "MountLabel": "", "StorageOpt": {}})
    return layer


def test_metrics_of_a_running_graph_driver(daemon: Daemon, tmp_path) -> None:
    c = PluginClient(daemon.proc.socket)
    c.call("GraphDriver.Init", {"Home": str(tmp_path / "home"), "Opts": None,
                                "UIDMaps": None, "GIDMaps": None})
    first = daemon.wait_for("cvmfs_graphdriver_layers", 0, kind="regular")
    assert value(first, "cvmfs_graphdriver_applydiff_total", face="graphdriver") == 0
    assert value(first, "cvmfs_graphdriver_repository_available", repository=REPO) == 1
    assert value(first, "cvmfs_graphdriver_repository_available", repository=GONE) == 0

    # a known layer: 1000 + 24 bytes of files
    base = create(c)
    size = c.apply_diff(base, "", TarBuilder().dir("etc").file("etc/a", b"a" * 1000)
                        .file("etc/b", b"b" * 24).bytes())["Size"]
    assert size == 1024
    samples = daemon.wait_for("cvmfs_graphdriver_applydiff_total", 1)
    assert value(samples, "cvmfs_graphdriver_applydiff_bytes_total") == 1024
    assert value(samples, "cvmfs_graphdriver_applydiff_seconds_total") > 0
    assert value(samples, "cvmfs_graphdriver_layers", kind="regular") == 1

    # a thin layer, and a container on it: its mount counts under its repository
    tid = create(c)
    c.apply_diff(tid, "", thin_tar(REPO))
    cid = create(c, tid, rw=True)
    root = c.call("GraphDriver.Get", {"ID": cid, "MountLabel": ""})["Dir"]
    with open(os.path.join(root, "etc", "hostname")) as f:
        assert f.read() == "thin\n"
    samples = daemon.wait_for("cvmfs_graphdriver_repository_mounts", 1, repository=REPO)
    assert value(samples, "cvmfs_graphdriver_repository_mounts", repository=GONE) == 0
    assert value(samples, "cvmfs_graphdriver_mounted_layers") == 1
    assert value(samples, "cvmfs_graphdriver_layers", kind="thin") == 1
    assert value(samples, "cvmfs_graphdriver_layers", kind="regular") == 2
    assert value(samples, "cvmfs_graphdriver_applydiff_total") == 2

    # a descriptor naming a repository this node does not allow: the pull fails, counted
    assert value(samples, "cvmfs_graphdriver_descriptor_errors_total") == 0
    bad = create(c)
    with pytest.raises(PluginError, match="not allowed"):
        c.apply_diff(bad, "", thin_tar("other.repo"))
    daemon.wait_for("cvmfs_graphdriver_descriptor_errors_total", 1)

    # the same, on the root-only socket
    assert stat.S_IMODE(os.stat(daemon.metrics_socket).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(daemon.metrics_socket).st_mode)
    status, ctype, body = http_get(daemon.metrics_socket, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    served = parse(body)
    assert value(served, "cvmfs_graphdriver_repository_mounts", repository=REPO) == 1
    assert value(served, "cvmfs_graphdriver_descriptor_errors_total") == 1
    assert value(served, "cvmfs_graphdriver_applydiff_bytes_total") >= 1024

    # the textfile cannot be written (its directory is gone): logged once, the daemon
    # serves on, and writes it again once it can
    moved = daemon.textfile_dir + ".away"
    os.rename(daemon.textfile_dir, moved)
    time.sleep(3.5)  # three rounds or more
    c.call("GraphDriver.Put", {"ID": cid})
    assert c.call("GraphDriver.Exists", {"ID": base}) == {"Exists": True}
    assert daemon.proc.proc is not None and daemon.proc.proc.poll() is None
    log = daemon.proc.log()
    assert log.count(f"metrics: cannot write {daemon.textfile_dir}/{TEXTFILE}") == 1, log
    os.rename(moved, daemon.textfile_dir)
    daemon.wait_for("cvmfs_graphdriver_mounted_layers", 0)
    wait_until(lambda: "written again" in daemon.proc.log(), 5, "the recovery logged")
    assert [n for n in os.listdir(daemon.textfile_dir)] == [TEXTFILE]  # no temporary left
    c.call("GraphDriver.Cleanup")
    c.close()


def test_a_metrics_socket_in_use_stops_the_start_with_the_reason(as_root, tmp_path) -> None:
    sockdir = tempfile.mkdtemp(prefix="cgdm-", dir="/tmp")
    try:
        sock = os.path.join(sockdir, "m.sock")
        first = DriverProcess(PLUGIN_NAME, str(tmp_path / "d1"),
                              ["--metrics-socket", sock]).start()
        try:
            second = DriverProcess(PLUGIN_NAME + "2", str(tmp_path / "d2"),
                                   ["--metrics-socket", sock])
            with pytest.raises(RuntimeError, match="exited with 2"):
                second.start()
            assert f"another process already serves {sock}" in second.log()
            assert not os.path.exists(second.socket)  # its plugin socket is not left
        finally:
            first.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
