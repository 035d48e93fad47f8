"""`cvmfs-graphdriver check`, one check at a time, pass and failure paths, without a node:
what each check reads comes in through check.Node (paths, the engine's command), the
sockets are real unix sockets served by the real plugin server, a real gRPC server and
small servers that answer wrongly. No root needed (the overlay and store checks that
mount are in tests/driver/test_check_store.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from cvmfs_graphdriver import check, cli, config, status, thin
from cvmfs_graphdriver.check import FAIL, NOT_CONFIGURED, OK, WARN, Node, Report
from cvmfs_graphdriver.config import Config
from cvmfs_graphdriver.driver import Driver
from cvmfs_graphdriver.server import PluginServer
from cvmfs_graphdriver.sockets import bind_socket
from cvmfs_graphdriver.status import StoreStatus, ThinLayerRef

REPO_ROOT = Path(__file__).resolve().parents[3]


def only(report: Report) -> check.Result:
    assert len(report.results) == 1, report.results
    return report.results[0]


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="chk-", dir="/tmp")  # unix socket paths: 108 bytes at most
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def serve_plugin(path: str, graph: bool = True) -> PluginServer:
    srv = PluginServer(bind_socket(path), Driver(Config()) if graph else None)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return srv


def serve_bytes(path: str, answer: bytes) -> socket.socket:
    """A server that answers every connection with `answer` and closes it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)

    def loop() -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return s


# ---------------------------------------------------------------------------- config, mode


def test_mode_comes_from_the_snapshotter_section(tmp_path):
    plugin = tmp_path / "plugin.ini"
    plugin.write_text("[driver]\nrepositories = a.repo\n")
    snap = tmp_path / "snap.ini"
    snap.write_text("[driver]\n[snapshotter]\nhome = /var/lib/x\n")
    assert config.configured_mode(str(plugin)) == "plugin"
    assert config.configured_mode(str(snap)) == "snapshotter"
    assert config.configured_mode(str(tmp_path / "absent.ini")) == "plugin"


def test_storage_driver_name_is_the_socket_name():
    assert check.driver_name("/run/docker/plugins/cvmfs.sock") == "cvmfs"
    assert check.driver_name("/run/docker/plugins/other.sock") == "other"


def test_a_broken_configuration_fails_naming_the_fix(tmp_path):
    bad = tmp_path / "config.ini"
    bad.write_text("[driver]\nlog_level = loud\n")
    report = check.run(Node(config_path=str(bad)))
    r = only(report)
    assert (r.name, r.status) == ("config", FAIL)
    assert "log_level" in r.detail and "show-config" in r.fix
    assert not report.ok


def test_a_missing_configuration_file_given_explicitly_fails(tmp_path):
    r = only(check.run(Node(config_path=str(tmp_path / "nope.ini"))))
    assert r.status == FAIL and "does not exist" in r.detail


def test_a_configuration_that_cannot_be_read_fails_instead_of_crashing(tmp_path, capsys):
    """A directory, a file that cannot be opened (a symlink loop stands in for one that
    is unreadable: the tests run as root) and a non-UTF-8 file: each a FAIL in the JSON
    playbooks/verify.yml parses, never a traceback."""
    loop = tmp_path / "loop.ini"
    loop.symlink_to(loop)
    latin = tmp_path / "latin.ini"
    latin.write_bytes(b"[driver]\n# caf\xe9\n")
    for path, says in ((tmp_path, "is a directory"), (loop, "cannot read"),
                       (latin, "not UTF-8")):
        rc = cli.main(["check", "--json", "--config", str(path)])
        out = json.loads(capsys.readouterr().out)
        assert rc == 1 and out["ok"] is False and out["failed"] == ["config"], out
        r = out["checks"][0]
        assert str(path) in r["detail"] and says in r["detail"] and "show-config" in r["fix"]


def test_a_check_that_raises_is_a_failure_not_a_crash(tmp_path, monkeypatch):
    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(check, "check_engine_config", broken)
    cfg = tmp_path / "config.ini"
    cfg.write_text(f"[driver]\nsocket = {tmp_path}/none.sock\n")
    report = check.run(Node(config_path=str(cfg), mode="plugin",
                            docker=[str(tmp_path / "no-docker")], timeout=0.5))
    assert report.results[-1].name == "check" and report.results[-1].status == FAIL
    assert "RuntimeError: boom" in report.results[-1].detail and not report.ok


# ---------------------------------------------------------------------------- plugin socket


def test_plugin_socket_answers_the_handshake(sockdir):
    path = os.path.join(sockdir, "p.sock")
    srv = serve_plugin(path)
    try:
        report = Report("plugin")
        check.check_plugin_socket(Node(timeout=5), Config(socket=path, volumes=False),
                                  "plugin", report)
        r = only(report)
        assert r.status == OK and "GraphDriver" in r.detail
    finally:
        srv.shutdown()
        srv.server_close()


def test_plugin_socket_without_the_face_the_configuration_asks_for(sockdir):
    """A daemon serving volumes only (the `volumes` command) where the plugin is expected."""
    path = os.path.join(sockdir, "p.sock")
    from cvmfs_graphdriver.volumes import Volumes

    srv = PluginServer(bind_socket(path), None,
                       Volumes("/cvmfs", (), os.path.join(sockdir, "vol.json")))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        report = Report("plugin")
        check.check_plugin_socket(Node(timeout=5), Config(socket=path), "plugin", report)
        r = only(report)
        assert r.status == FAIL
        assert "implements VolumeDriver, not GraphDriver" in r.detail
        assert "restart cvmfs-graphdriver.service" in r.fix
        # in snapshotter mode the same daemon is what is wanted
        report = Report("snapshotter")
        check.check_plugin_socket(Node(timeout=5), Config(socket=path), "snapshotter", report)
        assert only(report).status == OK
    finally:
        srv.shutdown()
        srv.server_close()


def test_plugin_socket_missing(sockdir):
    report = Report("plugin")
    path = os.path.join(sockdir, "gone.sock")
    check.check_plugin_socket(Node(timeout=2), Config(socket=path), "plugin", report)
    r = only(report)
    assert r.status == FAIL and r.detail == f"{path} does not exist"
    assert "systemctl restart cvmfs-graphdriver.socket cvmfs-graphdriver.service" in r.fix


def test_plugin_socket_nobody_listening(sockdir):
    path = os.path.join(sockdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # bound, never listening: what a crashed daemon leaves
    try:
        report = Report("plugin")
        check.check_plugin_socket(Node(timeout=2), Config(socket=path), "plugin", report)
        r = only(report)
        assert r.status == FAIL and "connection refused" in r.detail
    finally:
        s.close()


def test_plugin_socket_answering_something_else(sockdir):
    path = os.path.join(sockdir, "web.sock")
    s = serve_bytes(path, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    try:
        report = Report("plugin")
        check.check_plugin_socket(Node(timeout=2), Config(socket=path), "plugin", report)
        r = only(report)
        assert r.status == FAIL and "not a plugin's handshake" in r.detail
    finally:
        s.close()


def test_plugin_socket_that_never_answers(sockdir):
    path = os.path.join(sockdir, "mute.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)  # accepted by the kernel, never read
    try:
        report = Report("plugin")
        t0 = time.monotonic()
        check.check_plugin_socket(Node(timeout=0.5), Config(socket=path), "plugin", report)
        assert time.monotonic() - t0 < 5
        r = only(report)
        assert r.status == FAIL and "no answer in time" in r.detail
    finally:
        s.close()


def test_snapshotter_mode_without_volumes_needs_no_plugin_socket():
    report = Report("snapshotter")
    check.check_plugin_socket(Node(), Config(socket="/nonexistent/x.sock", volumes=False),
                              "snapshotter", report)
    assert only(report).status == NOT_CONFIGURED


# ---------------------------------------------------------------------------- snapshotter socket


def test_snapshotter_socket_answers_as_a_grpc_server(sockdir):
    grpc = pytest.importorskip("grpc")  # the snapshotter's own dependency
    from concurrent import futures

    path = os.path.join(sockdir, "sn.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        report = Report("snapshotter")
        check.check_snapshotter_socket(Node(timeout=5), Config(snapshotter_socket=path),
                                       "snapshotter", report)
        r = only(report)
        assert r.status == OK, r
    finally:
        server.stop(None)


def test_snapshotter_socket_answering_http1_fails(sockdir):
    path = os.path.join(sockdir, "h1.sock")
    s = serve_bytes(path, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        report = Report("snapshotter")
        check.check_snapshotter_socket(Node(timeout=2), Config(snapshotter_socket=path),
                                       "snapshotter", report)
        r = only(report)
        assert r.status == FAIL and "not an HTTP/2 SETTINGS frame" in r.detail
        assert "cvmfs-graphdriver-snapshotter.socket" in r.fix
    finally:
        s.close()


def test_snapshotter_socket_missing_and_plugin_mode(sockdir):
    report = Report("snapshotter")
    path = os.path.join(sockdir, "none.sock")
    check.check_snapshotter_socket(Node(timeout=2), Config(snapshotter_socket=path),
                                   "snapshotter", report)
    assert only(report).status == FAIL
    report = Report("plugin")
    check.check_snapshotter_socket(Node(), Config(), "plugin", report)
    assert only(report).status == NOT_CONFIGURED


# ---------------------------------------------------------------------------- home


def test_plugin_home_is_what_the_daemon_recorded(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state.json"
    def state_of(sock):
        return str(state)
    got, detail, fix = status.find_home(Config(), "plugin", state_of)
    assert got is None and "dockerd has not initialised the driver" in detail
    assert fix.startswith("systemctl start docker")
    state.write_text(json.dumps({"Home": str(home), "Refs": {}}))
    got, detail, _ = status.find_home(Config(), "plugin", state_of)
    assert got == str(home) and str(state) in detail
    home.rmdir()
    got, detail, fix = status.find_home(Config(), "plugin", state_of)
    assert got is None and "does not exist" in detail and "restart docker" in fix
    state.write_text("{not json")
    got, detail, _ = status.find_home(Config(), "plugin", state_of)
    assert got is None and "cannot read" in detail


def test_the_default_state_file_is_the_daemons():
    assert Node().state_file("/run/docker/plugins/cvmfs.sock") == \
        config.state_file("/run/docker/plugins/cvmfs.sock")


def test_snapshotter_home_is_configured(tmp_path):
    got, _, _ = status.find_home(Config(snapshotter_home=str(tmp_path)), "snapshotter")
    assert got == str(tmp_path)
    got, detail, fix = status.find_home(Config(snapshotter_home=str(tmp_path / "x")),
                                        "snapshotter")
    assert got is None and "does not exist" in detail and "snapshotter" in fix


def test_overlay_missing_from_the_kernel(tmp_path):
    fs = tmp_path / "filesystems"
    fs.write_text("nodev\tsysfs\nnodev\ttmpfs\n\text4\n")
    report = Report("plugin")
    check.check_overlay(Node(proc_filesystems=str(fs)), str(tmp_path), "plugin", report)
    r = only(report)
    assert r.status == FAIL and "no overlayfs" in r.detail and "modprobe overlay" in r.fix


def test_plugin_mode_in_a_user_namespace_fails(tmp_path):
    uid_map = tmp_path / "uid_map"
    uid_map.write_text("         0     100000      65536\n")
    report = Report("plugin")
    check.check_overlay(Node(uid_map=str(uid_map)), str(tmp_path), "plugin", report)
    r = only(report)
    assert r.status == FAIL and "userxattr" in r.detail and "snapshotter mode" in r.fix


def test_free_space(tmp_path):
    report = Report("plugin")
    check.check_free_space(Node(min_free=1), str(tmp_path), report)
    assert only(report).status == OK
    report = Report("plugin")
    check.check_free_space(Node(min_free=1 << 60), str(tmp_path), report)
    r = only(report)
    assert r.status == FAIL and "less than" in r.detail and "docker image prune" in r.fix


def test_free_space_of_a_home_that_cannot_be_statted_fails(tmp_path):
    report = Report("plugin")
    check.check_free_space(Node(), str(tmp_path / "gone"), report)
    r = only(report)
    assert r.status == FAIL and "cannot statvfs" in r.detail and "gone" in r.detail


# ---------------------------------------------------------------------------- engine


def fake_docker(tmp_path: Path, info: object, rc: int = 0, stderr: str = "") -> List[str]:
    """A `docker` that prints `info` as `docker info --format '{{json .}}'` does."""
    out = tmp_path / "info.json"
    out.write_text(json.dumps(info) if not isinstance(info, str) else info)
    script = tmp_path / "docker"
    script.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = 'info --format {{{{json .}}}}' ] || "
                      f"exit 99\ncat {out}\necho '{stderr}' >&2\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)]


def info(version: str, driver: str = "cvmfs", snapshotter: bool = False) -> Dict:
    status = [["driver-type", "io.containerd.snapshotter.v1"]] if snapshotter else \
        [["Driver Home", "/var/lib/docker/cvmfs"]]
    return {"ServerVersion": version, "Driver": driver, "DriverStatus": status}


@pytest.mark.parametrize("mode,version,driver,snap,ok_", [
    ("plugin", "20.10.24+dfsg1", "cvmfs", False, True),
    ("plugin", "27.5.1", "cvmfs", False, True),
    ("plugin", "28.0.1", "cvmfs", False, False),  # no graph-driver plugins any more
    ("plugin", "20.10.24", "overlay2", False, False),  # another driver
    ("plugin", "26.1.5", "cvmfs", True, False),  # the other face
    ("snapshotter", "29.1.3", "cvmfs", True, True),
    ("snapshotter", "26.1.5", "cvmfs", True, True),
    ("snapshotter", "23.0.6", "cvmfs", True, False),  # no containerd image store
    ("snapshotter", "29.1.3", "overlayfs", True, False),
    ("snapshotter", "26.1.5", "cvmfs", False, False),
])
def test_engine_version_driver_and_face(tmp_path, mode, version, driver, snap, ok_):
    report = Report(mode)
    check.check_engine(Node(docker=fake_docker(tmp_path, info(version, driver, snap))),
                       Config(), mode, "cvmfs", report)
    r = only(report)
    assert r.status == (OK if ok_ else FAIL), r
    assert version in r.detail
    if not ok_:
        assert r.fix


def test_engine_not_installed(tmp_path):
    report = Report("plugin")
    check.check_engine(Node(docker=[str(tmp_path / "no-docker")]), Config(), "plugin",
                       "cvmfs", report)
    r = only(report)
    assert r.status == FAIL and "is not installed" in r.detail
    assert "systemctl start docker" in r.fix


def test_engine_not_running(tmp_path):
    """The client alone: `docker info` prints ServerErrors and exits 1."""
    docker = fake_docker(tmp_path, {"ServerErrors": ["Cannot connect to the Docker daemon"]},
                         rc=1, stderr="Cannot connect to the Docker daemon")
    report = Report("plugin")
    check.check_engine(Node(docker=docker), Config(), "plugin", "cvmfs", report)
    r = only(report)
    assert r.status == FAIL and "Cannot connect" in r.detail and "journalctl" in r.fix


def test_engine_printing_no_json(tmp_path):
    report = Report("plugin")
    check.check_engine(Node(docker=fake_docker(tmp_path, "garbage")), Config(), "plugin",
                       "cvmfs", report)
    assert only(report).status == FAIL


def test_engine_that_hangs(tmp_path):
    script = tmp_path / "docker"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    report = Report("plugin")
    t0 = time.monotonic()
    check.check_engine(Node(docker=[str(script)], timeout=0.5), Config(), "plugin", "cvmfs",
                       report)
    assert time.monotonic() - t0 < 5
    r = only(report)
    assert r.status == FAIL and "did not answer" in r.detail


def test_version_numbers_are_the_roles():
    """The two Docker versions the faces are bound by are the docker_engine role's."""
    yaml = pytest.importorskip("yaml")
    role_vars = yaml.safe_load(
        (REPO_ROOT / "roles" / "docker_engine" / "vars" / "main.yml").read_text())
    assert role_vars["__docker_engine_plugin_max_major"] == check.PLUGIN_MAX_MAJOR
    assert role_vars["__docker_engine_snapshotter_min_major"] == check.SNAPSHOTTER_MIN_MAJOR


# ---------------------------------------------------------------------------- daemon.json


@pytest.mark.parametrize("mode,conf,status,words", [
    ("plugin", {"storage-driver": "cvmfs", "experimental": True}, OK, ""),
    ("plugin", {"storage-driver": "cvmfs", "experimental": True,
                "features": {"containerd-snapshotter": False}}, OK, ""),
    ("plugin", {"storage-driver": "overlay2", "experimental": True}, FAIL, "storage-driver"),
    ("plugin", {"storage-driver": "cvmfs"}, FAIL, "experimental"),
    ("plugin", {"storage-driver": "cvmfs", "experimental": True,
                "features": {"containerd-snapshotter": True}}, FAIL, "containerd-snapshotter"),
    ("snapshotter", {"storage-driver": "cvmfs",
                     "features": {"containerd-snapshotter": True}}, OK, ""),
    ("snapshotter", {"storage-driver": "cvmfs"}, FAIL, "containerd-snapshotter"),
    ("plugin", [], FAIL, "not a JSON object"),
])
def test_daemon_json(tmp_path, mode, conf, status, words):
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps(conf))
    report = Report(mode)
    check.check_engine_config(Node(daemon_json=str(path)), mode, "cvmfs", report)
    r = only(report)
    assert r.status == status, r
    assert words in r.detail
    if status == FAIL:
        assert "restart docker" in r.fix


def test_daemon_json_missing_unreadable_or_skipped(tmp_path):
    report = Report("plugin")
    check.check_engine_config(Node(daemon_json=str(tmp_path / "none.json")), "plugin",
                              "cvmfs", report)
    r = only(report)
    assert r.status == WARN and "site.yml" in r.fix
    (tmp_path / "bad.json").write_text("{")
    report = Report("plugin")
    check.check_engine_config(Node(daemon_json=str(tmp_path / "bad.json")), "plugin",
                              "cvmfs", report)
    assert only(report).status == FAIL
    report = Report("plugin")
    check.check_engine_config(Node(daemon_json=""), "plugin", "cvmfs", report)
    assert only(report).status == NOT_CONFIGURED


# ---------------------------------------------------------------------------- repositories


def published_repo(root: Path, repo: str, hexes: List[str]) -> None:
    for h in hexes:
        (root / repo / thin.layer_path(h) / "etc").mkdir(parents=True)


def test_no_repositories_is_said(tmp_path):
    report = Report("plugin")
    check.check_repositories(Node(), Config(), None, report)
    r = only(report)
    assert r.status == NOT_CONFIGURED and "thin images and lazy pulls are off" in r.detail


def test_repositories_reachable_and_their_layers_readable(tmp_path):
    h1, h2 = "a" * 64, "b" * 64
    published_repo(tmp_path, "one.repo", [h1, h2])
    (tmp_path / "two.repo").mkdir()
    store = StoreStatus("plugin", "/x", refs=[
        ThinLayerRef("L1", "one.repo", thin.layer_path(h1)),
        ThinLayerRef("L2", "one.repo", thin.layer_path(h2))])
    cfg = Config(cvmfs_root=str(tmp_path), repositories=("one.repo", "two.repo"))
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), cfg, store, report)
    one, two = report.results
    assert (one.name, one.status) == ("repository one.repo", OK)
    assert "the 2 layers this node's images use are readable" in one.detail
    assert (two.name, two.status) == ("repository two.repo", OK)
    assert "no published layers" in two.detail
    # with no image using it, its published layers are listed
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), cfg, None, report)
    assert "lists 2 prefixes" in report.results[0].detail


def test_repository_not_reachable(tmp_path):
    cfg = Config(cvmfs_root=str(tmp_path), repositories=("gone.repo",))
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), cfg, None, report)
    r = only(report)
    assert r.status == FAIL and "cannot be listed" in r.detail
    assert "cvmfs_config probe gone.repo" in r.fix


def test_a_layer_the_node_uses_is_gone(tmp_path):
    h1, h2 = "c" * 64, "d" * 64
    published_repo(tmp_path, "one.repo", [h1])
    store = StoreStatus("plugin", "/x", refs=[
        ThinLayerRef("L1", "one.repo", thin.layer_path(h1)),
        ThinLayerRef("L2", "one.repo", thin.layer_path(h2))])
    cfg = Config(cvmfs_root=str(tmp_path), repositories=("one.repo",))
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), cfg, store, report)
    r = only(report)
    assert r.status == FAIL
    assert "1 of the 2 layers" in r.detail and h2 in r.detail and h1 not in r.detail
    assert "republish" in r.fix


def test_layers_on_a_repository_no_longer_allowed_fail(tmp_path):
    """The daemon refuses to mount a layer whose repository left `repositories`; check
    must say so, naming the repository and the fix, even when none is allowed now."""
    h = "e" * 64
    published_repo(tmp_path, "old.repo", [h])
    (tmp_path / "one.repo").mkdir()
    store = StoreStatus("plugin", "/x", refs=[
        ThinLayerRef("L1", "old.repo", thin.layer_path(h)),
        ThinLayerRef("L2", "old.repo", thin.layer_path(h))])
    for allowed in (("one.repo",), ()):
        report = Report("plugin")
        check.check_repositories(Node(timeout=5), Config(cvmfs_root=str(tmp_path),
                                                         repositories=allowed), store, report)
        r = report.results[0]
        assert (r.name, r.status) == ("repository old.repo", FAIL), report.results
        assert "1 layers" in r.detail and "refuses to mount" in r.detail
        assert "add old.repo to `repositories`" in r.fix and "remove the images" in r.fix
        assert [x.status for x in report.results[1:]] == [OK] * len(allowed)


def test_a_layer_resolving_outside_its_repository_fails_as_its_mount_would(tmp_path):
    """check looks at a layer as the daemon's mount does (thin.resolve_layer_dir): a
    layer directory that is a symlink out of its repository is refused, not listed."""
    h = "f" * 64
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "etc").mkdir()
    layer = tmp_path / "one.repo" / thin.layer_path(h)
    layer.parent.mkdir(parents=True)
    layer.symlink_to(tmp_path / "host")
    store = StoreStatus("plugin", "/x", refs=[ThinLayerRef("L1", "one.repo",
                                                           thin.layer_path(h))])
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), Config(cvmfs_root=str(tmp_path),
                                                     repositories=("one.repo",)),
                             store, report)
    r = only(report)
    assert r.status == FAIL and "outside repository one.repo" in r.detail


def test_a_hung_repository_takes_one_timeout_not_one_per_layer(tmp_path, monkeypatch):
    hexes = [f"{i:064x}" for i in range(40)]
    published_repo(tmp_path, "one.repo", hexes)
    real_list = check._list
    layers = str(tmp_path / "one.repo" / thin.LAYERS_DIR) + "/"

    def hanging(path: str) -> List[str]:
        if path.startswith(layers):
            time.sleep(3)  # a layer whose listing hangs in the kernel
        return real_list(path)

    monkeypatch.setattr(check, "_list", hanging)
    store = StoreStatus("plugin", "/x", refs=[
        ThinLayerRef(f"L{i}", "one.repo", thin.layer_path(h)) for i, h in enumerate(hexes)])
    report = Report("plugin")
    t0 = time.monotonic()
    check.check_repositories(Node(timeout=0.5), Config(cvmfs_root=str(tmp_path),
                                                       repositories=("one.repo",)),
                             store, report)
    assert time.monotonic() - t0 < 2.5
    r = only(report)
    assert r.status == FAIL and "the 39 after it not checked" in r.detail


def test_within_gives_up_on_a_call_that_does_not_return():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        check.within(0.2, lambda: time.sleep(5))
    assert time.monotonic() - t0 < 2
    assert check.within(1, lambda: 7) == 7
    with pytest.raises(FileNotFoundError):
        check.within(1, lambda: os.listdir("/nonexistent/x"))


# ---------------------------------------------------------------------------- the report


def test_json_shape_and_exit_code(tmp_path, capsys):
    """The whole command on a node with nothing: every check is there, each failure with
    a fix, JSON that parses, exit 1."""
    conf = tmp_path / "config.ini"
    conf.write_text(f"[driver]\nsocket = {tmp_path}/none.sock\ncvmfs_root = {tmp_path}\n"
                    "repositories = gone.repo\n")
    rc = cli.main(["check", "--config", str(conf), "--json", "--docker",
                   str(tmp_path / "no-docker"), "--daemon-json", str(tmp_path / "d.json"),
                   "--timeout", "2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert set(out) == {"ok", "mode", "failed", "checks"}
    assert out["ok"] is False and out["mode"] == "plugin"
    names = [c["name"] for c in out["checks"]]
    assert names[:3] == ["config", "plugin socket", "snapshotter socket"]
    assert {"home", "engine", "engine config", "repository gone.repo"} <= set(names)
    for c in out["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["status"] in (OK, WARN, FAIL, NOT_CONFIGURED)
        if c["status"] == FAIL:
            assert c["fix"], c
    assert out["failed"] == [c["name"] for c in out["checks"] if c["status"] == FAIL]
    assert "plugin socket" in out["failed"] and "engine" in out["failed"]


def test_readable_output_names_each_fix(tmp_path, capsys):
    conf = tmp_path / "config.ini"
    conf.write_text(f"[driver]\nsocket = {tmp_path}/none.sock\n")
    rc = cli.main(["check", "--config", str(conf), "--docker", str(tmp_path / "no-docker"),
                   "--daemon-json", ""])
    text = capsys.readouterr().out
    assert rc == 1
    assert "[FAIL] plugin socket" in text
    assert "fix: systemctl restart cvmfs-graphdriver.socket" in text
    assert text.rstrip().splitlines()[-1].startswith("plugin mode: ")
    assert "check(s) failed" in text


def test_the_command_is_wired(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    assert "--json" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    assert "--json" in capsys.readouterr().out
