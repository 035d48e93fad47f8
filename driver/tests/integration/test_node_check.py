"""`cvmfs-graphdriver check` and `status` against a real node in miniature: the daemon
(`serve`, as systemd runs it, with a configuration file), a private dockerd on it (so
the driver's home is the one dockerd's Init gave), a regular image, a thin image and a
running container. check passes; it fails, naming the fix, when the plugin's socket is
gone or a repository cannot be read; status counts the layers. The CVMFS root is a
plain directory tree (the repository check lists directories, which a real client
serves the same way)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from typing import Any, Dict, Iterator, Tuple

import pytest
from harness import Dockerd, DriverProcess, import_busybox, need_docker

from cvmfs_graphdriver import thin
from cvmfs_graphdriver.config import state_file

pytestmark = pytest.mark.root

PLUGIN = os.environ.get("CVMFS_GRAPHDRIVER_TEST_PLUGIN", "cvmfs") + f"chk{os.getpid()}"
REPO = "test.repo"
HEX = hashlib.sha256(b"node-check").hexdigest()


def run_cli(*args: str) -> Tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver", *args],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Dict[str, Any]]:
    need_docker(busybox=True)
    work = tmp_path_factory.mktemp("node")
    root = work / "cvmfs"
    (root / REPO / thin.layer_path(HEX) / "etc").mkdir(parents=True)
    (root / REPO / thin.layer_path(HEX) / "etc" / "thin").write_text("from cvmfs\n")
    config = work / "config.ini"
    driver = DriverProcess(PLUGIN, str(work / "driver"), ["--config", str(config)])
    config.write_text(f"[driver]\nsocket = {driver.socket}\ncvmfs_root = {root}\n"
                      f"repositories = {REPO}\n")
    daemon_json = work / "daemon.json"  # what the docker_engine role writes
    daemon_json.write_text(json.dumps({"storage-driver": PLUGIN, "experimental": True}))
    driver.start()
    dockerd = None
    try:
        dockerd = Dockerd(str(work / "dockerd"), PLUGIN).start()
        busybox = import_busybox(dockerd, str(work))
        desc = {"version": "1.0", "layers": [
            {"digest": f"sha256:{HEX}", "url": f"cvmfs://{REPO}/{thin.layer_path(HEX)}"}]}
        tar = work / "thin.tar"
        (work / "thin.json").write_text(json.dumps(desc))
        subprocess.run(["tar", "-C", str(work), "-cf", str(tar), "thin.json"], check=True)
        dockerd.docker("import", "-", "thin:test", input=tar.read_bytes())
        cid = dockerd.out("run", "-d", "--network", "none", busybox, "sleep", "600").strip()
        yield {"driver": driver, "dockerd": dockerd, "config": str(config),
               "daemon_json": str(daemon_json), "root": str(root), "cid": cid,
               "args": ["--config", str(config), "--docker", f"docker -H {dockerd.host}",
                        "--daemon-json", str(daemon_json)]}
    finally:
        if dockerd is not None:
            with contextlib.suppress(Exception):
                dockerd.docker("rm", "-f", "-v", *dockerd.out("ps", "-aq").split(),
                               check=False)
            dockerd.stop()
        driver.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_file(driver.socket))


def checks(out: str) -> Dict[str, Dict[str, str]]:
    return {c["name"]: c for c in json.loads(out)["checks"]}


def test_check_passes_on_a_working_node(node):
    rc, out = run_cli("check", "--json", *node["args"])
    assert rc == 0, out
    doc = json.loads(out)
    assert doc["ok"] is True and doc["failed"] == [] and doc["mode"] == "plugin"
    got = checks(out)
    for name in ("config", "plugin socket", "home", "overlay", "free space", "engine",
                 "engine config", f"repository {REPO}"):
        assert got[name]["status"] == "ok", got[name]
    assert got["snapshotter socket"]["status"] == "not configured"
    assert "GraphDriver, VolumeDriver" in got["plugin socket"]["detail"]
    assert f"storage driver {PLUGIN} (graph-driver plugin)" in got["engine"]["detail"]
    home = node["dockerd"].data_root
    assert got["home"]["detail"].startswith(os.path.join(os.path.realpath(home), PLUGIN))
    assert "the 1 layers this node's images use are readable" in \
        got[f"repository {REPO}"]["detail"]
    assert got["layers"]["status"] == "ok"
    assert got["layers"]["detail"].startswith(
        "4 (3 regular, 1 thin, 0 lazily pulled, 0 incomplete), 1 active mounts")
    rc, text = run_cli("check", *node["args"])
    assert rc == 0 and "plugin mode: all checks passed" in text, text


def test_status_counts_the_nodes_layers(node):
    rc, out = run_cli("status", "--json", "--config", node["config"])
    assert rc == 0, out
    doc = json.loads(out)
    # busybox's layer, the container's init and read-write layers; the thin image's
    assert doc["layers"] == {"total": 4, "regular": 3, "thin": 1, "lazy": 0,
                             "incomplete": 0}
    assert doc["repositories"] == {REPO: {"thin": 1, "lazy": 0}}
    assert doc["mounts"]["active"] == 1  # the running container's root
    assert doc["disk"]["used_bytes"] > 0
    rc, text = run_cli("status", "--config", node["config"])
    assert rc == 0 and REPO in text and "active mounts" in text, text


def test_check_fails_naming_the_fix_when_the_socket_is_gone(node):
    sock = node["driver"].socket
    os.rename(sock, sock + ".moved")
    try:
        rc, out = run_cli("check", "--json", *node["args"])
    finally:
        os.rename(sock + ".moved", sock)
    assert rc == 1, out
    doc = json.loads(out)
    assert "plugin socket" in doc["failed"]
    c = checks(out)["plugin socket"]
    assert c["detail"] == f"{sock} does not exist"
    assert "systemctl restart cvmfs-graphdriver.socket cvmfs-graphdriver.service" in c["fix"]
    rc, text = run_cli("check", *node["args"])
    assert rc == 0, text  # back


def test_check_fails_naming_the_fix_when_a_repository_is_unreadable(node):
    repo = os.path.join(node["root"], REPO)
    os.rename(repo, repo + ".moved")
    try:
        rc, out = run_cli("check", "--json", *node["args"])
    finally:
        os.rename(repo + ".moved", repo)
    assert rc == 1, out
    doc = json.loads(out)
    assert doc["failed"] == [f"repository {REPO}"]
    c = checks(out)[f"repository {REPO}"]
    assert "cannot be listed" in c["detail"]
    assert f"cvmfs_config probe {REPO}" in c["fix"]
    rc, text = run_cli("check", "--json", *node["args"])
    assert rc == 0, text


def test_check_fails_when_docker_runs_another_storage_driver(node):
    rc, out = run_cli("check", "--json", "--storage-driver", "overlay2", *node["args"])
    assert rc == 1
    doc = json.loads(out)
    assert set(doc["failed"]) == {"engine", "engine config"}
    assert "not 'overlay2' as a graph-driver plugin" in checks(out)["engine"]["detail"]
