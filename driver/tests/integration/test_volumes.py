"""CVMFS inside containers: allowed repositories as read-only Docker volumes, through a
real dockerd talking to the daemon's VolumeDriver face (on by default, `volumes = true`).

The repositories are the `cvmfs` fixture's stand-ins (read-only bind mounts of a
publisher-side tree); the volume driver is the plugin under test (conftest's
PLUGIN_NAME, from CVMFS_GRAPHDRIVER_TEST_PLUGIN), never a hard-coded name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from harness import PLUGIN_DIR, import_busybox, running, socket_answers, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from test_serve_process import call  # noqa: E402  (the plugin protocol, spoken directly)

pytestmark = [pytest.mark.root, pytest.mark.docker]

REPO = "test.repo"


def _allowed(driver_proc) -> str:
    """The driver's message naming its allow-list (the session's --repositories)."""
    args = driver_proc.extra_args
    repos = args[args.index("--repositories") + 1].split(",")
    return "allowed: " + ", ".join(sorted(repos))


def _publish(cvmfs, rel: str, content: str, scratch: str) -> None:
    """Put a file into the repository (harness.CvmfsRepos.put_tree: `cvmfs_server ingest`
    on real CernVM-FS)."""
    tree = os.path.join(scratch, "tree")
    os.makedirs(tree)
    with open(os.path.join(tree, os.path.basename(rel)), "w") as f:
        f.write(content)
    os.chmod(tree, 0o755)
    cvmfs.put_tree(REPO, os.path.dirname(rel), tree)
    assert os.path.exists(os.path.join(cvmfs.root, REPO, rel))  # what the driver sees


@pytest.fixture(scope="module")
def marker(cvmfs, tmp_path_factory):
    rel = f"volume-check/{uuid.uuid4().hex[:8]}.txt"
    content = f"published in {REPO}: {rel}\n"
    _publish(cvmfs, rel, content, str(tmp_path_factory.mktemp("volumes")))
    return rel, content


@pytest.fixture
def env(docker_clean, driver_proc, marker, busybox):
    """(dockerd, plugin name, a file published in test.repo and its content); every volume
    a test makes is removed afterwards."""
    d = docker_clean
    before = set(d.out("volume", "ls", "-q").split())
    yield d, driver_proc.name, marker[0], marker[1]
    for name in set(d.out("volume", "ls", "-q").split()) - before:
        d.docker("volume", "rm", "-f", name, check=False)
    d.docker("volume", "rm", "-f", REPO, check=False)


def _run(d, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return d.docker("run", "--rm", "--network", "none", *args, check=check)


def _refused(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, f"accepted: {r.stdout!r}"
    return r.stderr.decode(errors="replace")


def _mounts(driver_socket: str) -> int:
    got = call(driver_socket, "VolumeDriver.Get", {"Name": REPO})
    return int(got["Volume"]["Status"]["Mounts"])


def test_container_reads_the_repository_through_mount_and_v(env):
    d, plugin, marker, content = env
    out = _run(d, "--mount", f"type=volume,volume-driver={plugin},src={REPO},"
               f"dst=/cvmfs/{REPO}", "busybox:test", "cat", f"/cvmfs/{REPO}/{marker}")
    assert out.stdout.decode() == content
    out = _run(d, "-v", f"{REPO}:/x", "--volume-driver", plugin, "busybox:test",
               "cat", f"/x/{marker}")
    assert out.stdout.decode() == content


def test_the_volume_is_read_only_in_the_container(env, cvmfs):
    d, plugin, marker, _ = env
    script = ("for op in 'echo x > /r/new' 'echo x >> /r/" + marker + "' 'mkdir /r/d' "
              "'rm /r/" + marker + "' 'touch /r/volume-check'; do "
              "sh -c \"$op\" 2>&1 && echo \"WROTE: $op\"; done; true")
    for how in (["-v", f"{REPO}:/r", "--volume-driver", plugin],
                ["--mount", f"type=volume,volume-driver={plugin},src={REPO},dst=/r"]):
        out = _run(d, *how, "busybox:test", "sh", "-c", script).stdout.decode()
        assert "WROTE" not in out, out
        assert out.count("Read-only file system") == 5, out
    repo = os.path.join(cvmfs.root, REPO)  # the driver's (and the containers') view
    assert not os.path.exists(os.path.join(repo, "new"))
    assert not os.path.exists(os.path.join(repo, "d"))
    assert os.path.exists(os.path.join(repo, marker))


def test_a_repository_off_the_allow_list_is_refused(env, cvmfs, driver_proc):
    d, plugin, _, _ = env
    allowed = _allowed(driver_proc)
    os.makedirs(os.path.join(cvmfs.root, "other.repo"), exist_ok=True)
    msg = _refused(d.docker("volume", "create", "-d", plugin, "other.repo", check=False))
    assert "repository other.repo is not allowed on this node" in msg, msg
    assert allowed in msg, msg
    msg = _refused(_run(d, "--mount", f"type=volume,volume-driver={plugin},src=other.repo,"
                        "dst=/x", "busybox:test", "true", check=False))
    assert "repository other.repo is not allowed on this node" in msg, msg
    msg = _refused(_run(d, "-v", "other.repo:/x", "--volume-driver", plugin,
                        "busybox:test", "true", check=False))
    assert "not allowed" in msg and allowed in msg, msg
    assert "other.repo" not in d.out("volume", "ls", "-q").split()


@pytest.mark.parametrize("name", ["../etc", "/etc", "x/../..", "..", "test.repo/.."])
def test_hostile_names_are_refused(env, driver_proc, name):
    """Refused by the driver with the allowed repositories named. (`-v /etc:/x` and
    `-v ../etc:/x` are bind mounts in Docker's syntax: they never reach a volume driver,
    so they are not this driver's to refuse; `--mount type=volume` and `docker volume
    create` hand such names to it, the CLI making a relative one absolute.)"""
    d, plugin, _, _ = env
    allowed = _allowed(driver_proc)
    msg = _refused(d.docker("volume", "create", "-d", plugin, name, check=False))
    assert f"VolumeDriver.Create: invalid repository name '{name}'" in msg, msg
    assert allowed in msg, msg
    msg = _refused(_run(d, "--mount", f"type=volume,volume-driver={plugin},src={name},"
                        "dst=/x", "busybox:test", "cat", "/x/passwd", check=False))
    assert "VolumeDriver.Create: invalid repository name" in msg and allowed in msg, msg
    if not name.startswith((".", "/")):
        msg = _refused(_run(d, "-v", f"{name}:/x", "--volume-driver", plugin,
                            "busybox:test", "cat", "/x/passwd", check=False))
        assert "VolumeDriver.Create: invalid repository name" in msg and allowed in msg, msg
    assert name not in d.out("volume", "ls", "-q").split()


def test_options_are_refused(env):
    d, plugin, _, _ = env
    msg = _refused(d.docker("volume", "create", "-d", plugin, "-o", "device=/etc", "-o",
                            "o=bind", REPO, check=False))
    assert "cvmfs volumes take no options (got: device, o)" in msg, msg


def test_volume_ls_inspect_rm(env):
    d, plugin, marker, content = env
    assert d.out("volume", "create", "-d", plugin, REPO).strip() == REPO
    listed = d.out("volume", "ls", "--format", "{{.Driver}} {{.Name}}").splitlines()
    assert f"{plugin} {REPO}" in listed
    info = json.loads(d.out("volume", "inspect", REPO))[0]
    assert info["Driver"] == plugin and info["Name"] == REPO and info["Scope"] == "local"
    assert info["Status"]["Repository"] == REPO and info["Status"]["ReadOnly"] is True
    # a container uses the volume by name alone once it exists
    assert _run(d, "-v", f"{REPO}:/r", "busybox:test", "cat",
                f"/r/{marker}").stdout.decode() == content
    d.docker("volume", "rm", REPO)
    assert REPO not in d.out("volume", "ls", "-q").split()
    msg = _refused(d.docker("volume", "inspect", REPO, check=False))
    assert "no such volume" in msg.lower(), msg


def test_two_containers_share_a_volume_and_the_refcount_follows(env, driver_proc):
    d, plugin, marker, content = env
    d.docker("volume", "create", "-d", plugin, REPO)
    base = _mounts(driver_proc.socket)
    how = ["-v", f"{REPO}:/r", "--volume-driver", plugin, "busybox:test"]
    with running(d, *how, "sleep", "300") as a:
        with running(d, *how, "sleep", "300") as b:
            assert _mounts(driver_proc.socket) == base + 2
            for cid in (a, b):
                assert d.out("exec", cid, "cat", f"/r/{marker}") == content
            d.docker("rm", "-f", b)
            assert _mounts(driver_proc.socket) == base + 1
            # the one still running keeps its view of the repository
            assert d.out("exec", a, "cat", f"/r/{marker}") == content
            msg = _refused(d.docker("volume", "rm", REPO, check=False))
            assert "in use" in msg, msg
        d.docker("rm", "-f", a)
        assert _mounts(driver_proc.socket) == base
    d.docker("volume", "rm", REPO)


@pytest.fixture
def volumes_only(driver_proc, cvmfs):
    """`cvmfs-graphdriver volumes`: the volume driver alone on its own plugin socket, as
    a node in snapshotter mode runs it (no graph driver on that dockerd)."""
    name = f"{driver_proc.name}-volonly"
    sock = os.path.join(PLUGIN_DIR, f"{name}.sock")
    args = driver_proc.extra_args
    log_path = os.path.join(driver_proc.workdir, "volumes-only.log")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cvmfs_graphdriver", "volumes", "--socket", sock,
             "--log-level", "debug", *args], stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or socket_answers(sock), 15,
                   f"volumes socket {sock}", log_path)
        assert proc.poll() is None, f"exited {proc.returncode}; see {log_path}"
        yield name, sock
    finally:
        proc.terminate()
        proc.wait(15)


def test_volumes_alone_serve_a_dockerd_on_another_storage(volumes_only, ref_dockerd,
                                                          marker, workdir):
    """What snapshotter mode relies on: a dockerd whose layers are not ours (here the
    built-in overlay2) still mounts repositories through the volumes-only daemon."""
    name, sock = volumes_only
    assert call(sock, "Plugin.Activate", {}) == {"Implements": ["VolumeDriver"]}
    d = ref_dockerd
    image = import_busybox(d, workdir, tag="busybox:volumes")
    rel, content = marker
    try:
        out = _run(d, "--mount", f"type=volume,volume-driver={name},src={REPO},"
                   f"dst=/cvmfs/{REPO}", image, "sh", "-c",
                   f"cat /cvmfs/{REPO}/{rel}; touch /cvmfs/{REPO}/x 2>&1; true")
        assert out.stdout.decode().startswith(content)
        assert "Read-only file system" in out.stdout.decode()
        msg = _refused(d.docker("volume", "create", "-d", name, "other.repo", check=False))
        assert "repository other.repo is not allowed on this node" in msg, msg
    finally:
        d.docker("volume", "rm", "-f", REPO, check=False)
