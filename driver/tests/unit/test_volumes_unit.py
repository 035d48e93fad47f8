"""The VolumeDriver face (volumes.py) through the real plugin server on a unix socket:
names checked once (thin.check_repository_name, thin.check_allowed), only allowed
repositories mounted, and only the repository's own directory; state kept across a
restart. The CVMFS root here is a plain directory: no root, no mounts needed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

import pytest
from test_serve_process import call, wait_for

from cvmfs_graphdriver import volumes as volumes_mod
from cvmfs_graphdriver.config import Config, parse
from cvmfs_graphdriver.driver import Driver
from cvmfs_graphdriver.server import PluginServer
from cvmfs_graphdriver.sockets import bind_socket
from cvmfs_graphdriver.volumes import Volumes

ALLOWED = ("ducc.repo", "gone.repo", "link.repo", "test.repo")


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(path) == 0


@pytest.fixture
def root(tmp_path) -> str:
    r = tmp_path / "cvmfs"
    (r / "test.repo" / "dir").mkdir(parents=True)
    (r / "test.repo" / "dir" / "file").write_text("hello from test.repo\n")
    (r / "ducc.repo").mkdir()
    (r / "other.repo").mkdir()  # present, but not on the allow-list
    os.symlink("/etc", r / "link.repo")  # allowed name, but not the repository itself
    return str(r)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cgdv-", dir="/tmp")  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(sockdir):
    servers = []

    def start(driver, vols) -> str:
        path = os.path.join(sockdir, f"v{len(servers)}.sock")
        srv = PluginServer(bind_socket(path), driver, vols)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return path

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def state(tmp_path) -> str:
    return str(tmp_path / "state" / "volumes.json")


@pytest.fixture
def vsock(serve, root, state) -> str:
    return serve(None, Volumes(root, ALLOWED, state))


def test_activate_names_the_faces_served(serve, root, state):
    vols = Volumes(root, ALLOWED, state)
    only_volumes = serve(None, vols)
    assert call(only_volumes, "Plugin.Activate", {}) == {"Implements": ["VolumeDriver"]}
    err = call(only_volumes, "GraphDriver.Get", {"ID": "a" * 64})
    assert "unknown plugin call GraphDriver.Get" in err["Err"]

    graph_only = serve(Driver(Config()), None)
    assert call(graph_only, "Plugin.Activate", {}) == {"Implements": ["GraphDriver"]}
    err = call(graph_only, "VolumeDriver.Create", {"Name": "test.repo"})
    assert "volumes = true" in err["Err"]

    both = serve(Driver(Config()), vols)
    assert call(both, "Plugin.Activate", {}) == {"Implements": ["GraphDriver", "VolumeDriver"]}


def test_lifecycle_as_dockerd_drives_it(vsock, root, state):
    path = os.path.join(os.path.realpath(root), "test.repo")
    assert call(vsock, "VolumeDriver.Capabilities", {}) == {"Capabilities": {"Scope": "local"}}
    assert call(vsock, "VolumeDriver.List", {}) == {"Volumes": []}
    assert "no such cvmfs volume test.repo" in call(vsock, "VolumeDriver.Get",
                                                    {"Name": "test.repo"})["Err"]

    assert call(vsock, "VolumeDriver.Create", {"Name": "test.repo", "Opts": {}}) == {}
    assert call(vsock, "VolumeDriver.Create", {"Name": "test.repo"}) == {}  # idempotent
    got = call(vsock, "VolumeDriver.Get", {"Name": "test.repo"})["Volume"]
    assert got["Name"] == "test.repo" and "Mountpoint" not in got  # not mounted yet
    assert got["Status"] == {"Repository": "test.repo", "Path": path, "ReadOnly": True,
                             "Allowed": True, "Mounts": 0}
    assert call(vsock, "VolumeDriver.Path", {"Name": "test.repo"}) == {"Mountpoint": ""}

    # two containers: reference counted per mount ID
    a, b = "a" * 64, "b" * 64
    assert call(vsock, "VolumeDriver.Mount", {"Name": "test.repo", "ID": a}) == {
        "Mountpoint": path}
    assert call(vsock, "VolumeDriver.Mount", {"Name": "test.repo", "ID": b}) == {
        "Mountpoint": path}
    with open(os.path.join(path, "dir", "file")) as f:
        assert f.read() == "hello from test.repo\n"
    assert call(vsock, "VolumeDriver.Get", {"Name": "test.repo"})["Volume"]["Status"][
        "Mounts"] == 2
    assert call(vsock, "VolumeDriver.Unmount", {"Name": "test.repo", "ID": a}) == {}
    assert call(vsock, "VolumeDriver.Path", {"Name": "test.repo"}) == {"Mountpoint": path}
    assert call(vsock, "VolumeDriver.List", {}) == {
        "Volumes": [{"Name": "test.repo", "Mountpoint": path}]}
    assert call(vsock, "VolumeDriver.Unmount", {"Name": "test.repo", "ID": a}) == {}  # again
    assert call(vsock, "VolumeDriver.Unmount", {"Name": "test.repo", "ID": b}) == {}
    assert call(vsock, "VolumeDriver.Path", {"Name": "test.repo"}) == {"Mountpoint": ""}

    assert call(vsock, "VolumeDriver.Remove", {"Name": "test.repo"}) == {}
    assert call(vsock, "VolumeDriver.List", {}) == {"Volumes": []}
    assert call(vsock, "VolumeDriver.Remove", {"Name": "test.repo"}) == {}  # idempotent
    st = os.stat(state)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


HOSTILE = ["../etc", "/etc", "x/../..", "..", "", ".", "test.repo/..", "test.repo/dir",
           "-rf", "a\x00b", "a b", 5, None, ["test.repo"], "x" * 300]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
@pytest.mark.parametrize("method", ["VolumeDriver.Create", "VolumeDriver.Mount"])
def test_hostile_names_are_refused_naming_the_allowed_list(vsock, method, name):
    err = call(vsock, method, {"Name": name, "ID": "c" * 64})["Err"]
    assert f"{method}: invalid repository name" in err
    assert "allowed: ducc.repo, gone.repo, link.repo, test.repo" in err
    assert call(vsock, "VolumeDriver.List", {}) == {"Volumes": []}


@pytest.mark.parametrize("method", ["VolumeDriver.Create", "VolumeDriver.Mount"])
def test_a_repository_off_the_allow_list_is_refused(vsock, method):
    err = call(vsock, method, {"Name": "other.repo", "ID": "c" * 64})["Err"]
    assert "repository other.repo is not allowed on this node" in err
    assert "allowed: ducc.repo, gone.repo, link.repo, test.repo" in err
    assert "repositories" in err  # which key to change


def test_options_are_refused(vsock):
    err = call(vsock, "VolumeDriver.Create", {"Name": "test.repo",
                                               "Opts": {"o": "rw", "device": "/etc"}})["Err"]
    assert "take no options" in err and "device, o" in err
    assert call(vsock, "VolumeDriver.List", {}) == {"Volumes": []}


def test_mount_serves_only_the_repository_directory_itself(vsock, root):
    call(vsock, "VolumeDriver.Create", {"Name": "link.repo"})
    err = call(vsock, "VolumeDriver.Mount", {"Name": "link.repo", "ID": "d" * 64})["Err"]
    assert "resolves to /etc" in err and "refusing" in err
    err = call(vsock, "VolumeDriver.Mount", {"Name": "gone.repo", "ID": "d" * 64})["Err"]
    assert "CVMFS repository gone.repo is not available" in err
    assert "cvmfs_config probe gone.repo" in err
    err = call(vsock, "VolumeDriver.Mount", {"Name": "test.repo", "ID": "../x"})["Err"]
    assert "invalid mount ID" in err


@pytest.mark.parametrize("mount_id", [["a" * 64], {"a": 1}, 5, None])
def test_unmount_with_a_mount_id_that_is_not_a_string_is_refused(vsock, mount_id):
    """(issue 11, finding 7) A list or an object as the ID made a 500 (unhashable)."""
    call(vsock, "VolumeDriver.Create", {"Name": "test.repo"})
    err = call(vsock, "VolumeDriver.Unmount", {"Name": "test.repo", "ID": mount_id})["Err"]
    assert "VolumeDriver.Unmount: volume test.repo: invalid mount ID" in err
    assert call(vsock, "VolumeDriver.Get", {"Name": "test.repo"})["Volume"]["Name"] == \
        "test.repo"


@pytest.mark.parametrize("kind", ["fifo", "file"])
def test_a_repository_that_is_not_a_directory_is_refused_at_once(root, state, kind):
    """(issue 11, finding 8) A FIFO where the repository should be is never opened as a
    file: its open would block the daemon until someone writes to it."""
    path = os.path.join(root, "odd.repo")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "w") as f:
            f.write("x")
    vols = Volumes(root, ALLOWED + ("odd.repo",), state)
    out = {}

    def mount() -> None:
        try:
            vols.mount("odd.repo", "f" * 64)
        except Exception as e:  # the expected refusal, checked below
            out["error"] = e

    t = threading.Thread(target=mount, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # release it
        pytest.fail("Mount hung opening a FIFO")
    assert "CVMFS repository odd.repo is not available" in str(out["error"])
    assert "is not a directory" in str(out["error"])


def test_allow_list_is_checked_again_at_mount(root, state):
    Volumes(root, ALLOWED, state).create("test.repo", None)
    later = Volumes(root, ("ducc.repo",), state)  # test.repo dropped from the list
    with pytest.raises(Exception, match="test.repo is not allowed"):
        later.mount("test.repo", "e" * 64)
    later.remove("test.repo")  # what is no longer allowed can still be removed
    assert later.list() == []


def test_state_survives_a_restart_and_mounts_not_a_reboot(root, state, monkeypatch):
    v = Volumes(root, ALLOWED, state)
    v.create("test.repo", {})
    v.create("ducc.repo", None)
    v.mount("test.repo", "f" * 64)
    again = Volumes(root, ALLOWED, state)
    assert [x["Name"] for x in again.list()] == ["ducc.repo", "test.repo"]
    assert again.mount_ids("test.repo") == {"f" * 64}
    monkeypatch.setattr(volumes_mod, "_boot_id", lambda: "another-boot")
    rebooted = Volumes(root, ALLOWED, state)
    assert [x["Name"] for x in rebooted.list()] == ["ducc.repo", "test.repo"]
    assert rebooted.mount_ids("test.repo") == set()


@pytest.mark.parametrize("content", ["{not json", '{"version": 99}', "[]",
                                     '{"version": 1, "volumes": {"../etc": {}}}',
                                     '{"version": 1, "volumes": {"test.repo": 3}}'])
def test_an_unusable_state_file_means_no_volumes(root, state, content):
    os.makedirs(os.path.dirname(state))
    with open(state, "w") as f:
        f.write(content)
    v = Volumes(root, ALLOWED, state)
    assert v.list() == []
    v.create("test.repo", None)  # and it is replaced by a good one
    with open(state) as f:
        assert list(json.load(f)["volumes"]) == ["test.repo"]


def test_a_change_that_cannot_be_saved_is_refused_and_undone(root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    v = Volumes(root, ALLOWED, str(blocker / "volumes.json"))  # parent is a file
    with pytest.raises(Exception, match="cannot record the cvmfs volumes"):
        v.create("test.repo", None)
    assert v.list() == []


def test_config_key_and_default():
    assert Config().volumes is True
    assert parse("[driver]\nvolumes = false\n").volumes is False


def test_volumes_command_serves_only_volumes(tmp_path, sockdir):
    sock_path = os.path.join(sockdir, "cvmfs.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_graphdriver", "volumes", "--socket", sock_path,
         "--cvmfs-root", str(tmp_path), "--repositories", "test.repo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _answers(sock_path))
        assert call(sock_path, "Plugin.Activate", {}) == {"Implements": ["VolumeDriver"]}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert b"VolumeDriver" in out


def test_volumes_command_refuses_when_volumes_are_off(tmp_path):
    config = tmp_path / "config.ini"
    config.write_text("[driver]\nvolumes = false\n")
    r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver", "volumes", "--config",
                        str(config)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "volumes = false" in r.stderr


@pytest.mark.parametrize("flag, faces", [("--no-volumes", ["GraphDriver"]),
                                         ("--volumes", ["GraphDriver", "VolumeDriver"])])
def test_serve_volumes_flag(sockdir, flag, faces):
    sock_path = os.path.join(sockdir, "flag.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_graphdriver", "serve", "--config", "/dev/null",
         "--socket", sock_path, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _answers(sock_path))
        assert call(sock_path, "Plugin.Activate", {}) == {"Implements": faces}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
