"""A private containerd (Debian 12's 1.6.20) with the snapshotter as `[proxy_plugins.cvmfs]`:
`ctr` imports and runs images through it, whiteouts and opaque directories come out as
under containerd's built-in overlayfs snapshotter, and a kill -9 of the snapshotter while a
container runs changes nothing for the container or the snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest
from containerd_harness import Containerd, OciImage, busybox_layer, layer_tar
from sntools import Client, Daemon, need, need_grpc, wait_for

IMAGE = "docker.io/cgd/busybox:1"
LAYERED = "docker.io/cgd/layered:1"

# Three layers on busybox: files, then deletions and an opaque directory, then re-creations.
LAYER_FILES = [
    ("data", "dir"), ("data/keep", "dir"), ("data/keep/file", "file", b"keep\n"),
    ("data/gone", "file", b"gone\n"), ("data/gone-dir", "dir"),
    ("data/gone-dir/f", "file", b"f\n"), ("data/opq", "dir", b"", 0o750, 12, 34),
    ("data/opq/old", "file", b"old\n"), ("data/opq/sub", "dir"),
    ("data/opq/sub/x", "file", b"x\n"), ("data/f2d", "file", b"file\n"),
    ("data/owned", "file", b"o\n", 0o4750, 1234, 5678),
]
LAYER_DELETES = [
    ("data", "dir"), ("data/gone", "whiteout"), ("data/gone-dir", "whiteout"),
    ("data/opq", "dir", b"", 0o750, 12, 34), ("data/opq", "opaque"),
    ("data/opq/new", "file", b"new\n"), ("data/f2d", "whiteout"), ("data/f2d", "dir"),
    ("data/f2d/inside", "file", b"inside\n"),
]
LAYER_AGAIN = [
    ("data", "dir"), ("data/gone-dir", "dir", b"", 0o700), ("data/gone-dir/again", "file",
                                                             b"again\n"),
    ("data/keep", "dir"), ("data/keep/.wh.not-a-whiteout-here", "whiteout"),
]
# A listing a user compares: every path below /data with its type, mode, owner and size.
LIST_CMD = ("cd / && find data | sort | while read -r f; do "
            "stat -c '%n|%F|%a|%u|%g|%s' \"$f\"; done")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The snapshotter daemon and a containerd that loads it; both torn down afterwards."""
    need(os.geteuid() == 0, "needs root (containerd, mounts)")
    need_grpc()
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        need(shutil.which(tool) is not None,
             f"{tool} is not installed (Debian: containerd, runc; scripts/setup.sh)")
    need(os.path.exists("/bin/busybox"), "busybox-static is not installed")
    work = str(tmp_path_factory.mktemp("ctrd"))
    daemon = Daemon(os.path.join(work, "snapshotter")).start()
    containerd = Containerd(os.path.join(work, "containerd"), daemon.socket)
    try:
        containerd.start()
        base = busybox_layer(work)
        for image in (OciImage(IMAGE, [base]),
                      OciImage(LAYERED, [base, layer_tar(LAYER_FILES), layer_tar(LAYER_DELETES),
                                         layer_tar(LAYER_AGAIN)])):
            archive = os.path.join(work, image.name.replace("/", "_") + ".tar")
            with open(archive, "wb") as f:
                f.write(image.archive())
            containerd.ctr("images", "import", "--snapshotter", "cvmfs", archive)
        yield daemon, containerd
    finally:
        containerd.stop()
        daemon.stop()


def diff_ids(containerd: Containerd, image: str) -> list:
    """The image's layer diff ids, from its config in containerd's content store."""
    manifest = json.loads(containerd.out("content", "get", _manifest_digest(containerd, image)))
    config = json.loads(containerd.out("content", "get", manifest["config"]["digest"]))
    return config["rootfs"]["diff_ids"]


def _manifest_digest(containerd: Containerd, image: str) -> str:
    for line in containerd.out("images", "ls").splitlines()[1:]:
        fields = line.split()
        if fields[0] == image:
            return fields[2]
    raise AssertionError(f"{image} is not in containerd's image list")


def run(containerd: Containerd, snapshotter: str, image: str, *cmd: str) -> str:
    cid = f"run-{snapshotter}-{time.monotonic_ns()}"
    return containerd.out("run", "--rm", "--snapshotter", snapshotter, image, cid, *cmd)


def test_containerd_lists_the_proxy_plugin_ok(stack):
    _, containerd = stack
    rows = [line.split() for line in containerd.out("plugins", "ls").splitlines()]
    assert ["io.containerd.snapshotter.v1", "cvmfs", "-", "ok"] in rows
    assert ["io.containerd.snapshotter.v1", "overlayfs", "linux/amd64", "ok"] in rows


def test_import_unpacks_into_our_snapshotter_and_ctr_runs_it(stack):
    daemon, containerd = stack
    out = run(containerd, "cvmfs", IMAGE, "sh", "-c", "echo hello from $(cat /etc/group | "
              "head -1 | cut -d: -f1); ls /bin/busybox")
    assert out.splitlines() == ["hello from root", "/bin/busybox"]
    # Every layer of both images is a committed snapshot named by its chain id: in
    # containerd's view, and in ours as "<namespace>/<n>/<chain id>", parents alike.
    chains = set()
    for image in (IMAGE, LAYERED):
        chain = ""
        for diff_id in diff_ids(containerd, image):
            chain = diff_id if not chain else \
                "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
            chains.add(chain)
    rows = [line.split() for line in
            containerd.out("snapshots", "--snapshotter", "cvmfs", "ls").splitlines()[1:]]
    assert {r[0] for r in rows if r[-1] == "Committed"} == chains
    c = Client(daemon.socket)
    ours = {i.name.rsplit("/", 1)[-1]: i for i in c.list("kind==committed")}
    c.close()
    assert set(ours) == chains
    assert all(i.name.startswith("cgd-test/") for i in ours.values())


def test_whiteouts_and_opaque_dirs_as_builtin_overlayfs(stack):
    _, containerd = stack
    ours = run(containerd, "cvmfs", LAYERED, "sh", "-c", LIST_CMD)
    theirs = run(containerd, "overlayfs", LAYERED, "sh", "-c", LIST_CMD)
    assert ours == theirs
    listing = {line.split("|")[0]: line.split("|")[1:] for line in ours.splitlines()}
    assert sorted(listing) == sorted([
        "data", "data/keep", "data/keep/file", "data/opq", "data/opq/new", "data/f2d",
        "data/f2d/inside", "data/owned", "data/gone-dir", "data/gone-dir/again"])
    assert listing["data/opq"][:4] == ["directory", "750", "12", "34"]
    assert listing["data/owned"][:4] == ["regular file", "4750", "1234", "5678"]
    assert listing["data/gone-dir"][:2] == ["directory", "700"]
    assert not any(".wh." in p for p in listing)


def test_a_container_writes_into_its_active_snapshot(stack):
    daemon, containerd = stack
    out = run(containerd, "cvmfs", LAYERED, "sh", "-c",
              "rm data/keep/file && echo w > data/new && ls data && echo -- && ls data/keep "
              "&& echo -- && cat data/new")
    assert out.split() == ["f2d", "gone-dir", "keep", "new", "opq", "owned", "--", "--", "w"]
    # --rm deleted the container; containerd's garbage collector removes its snapshot from
    # the snapshotter: only the images' committed snapshots remain
    containerd.gc()
    c = Client(daemon.socket)
    assert c.names("kind==active") == []
    assert c.names("kind==committed")
    c.close()


def test_kill_9_of_the_snapshotter_while_a_container_runs(stack):
    daemon, containerd = stack
    cid = "survivor"
    containerd.ctr("run", "-d", "--snapshotter", "cvmfs", LAYERED, cid, "sh", "-c",
                   "echo started > /data/state; exec sleep 1000")
    try:
        wait_for(lambda: "RUNNING" in containerd.out("tasks", "ls"), 60, "task running")
        c = Client(daemon.socket)
        before = sorted((i.name, i.kind, i.parent) for i in c.list())
        c.close()
        assert any(i[1] == 2 for i in before), "the container's active snapshot"
        daemon.kill9()
        # the snapshotter is gone: the container is not
        exec_out = containerd.out("tasks", "exec", "--exec-id", "e1", cid, "cat",
                                  "/data/state", "/data/keep/file")
        assert exec_out.split() == ["started", "keep"]
        daemon.start()
        c = Client(daemon.socket)
        after = sorted((i.name, i.kind, i.parent) for i in c.list())
        assert after == before
        c.close()
        assert "RUNNING" in containerd.out("tasks", "ls")
        # containerd reconnects to the restarted snapshotter and works through it
        wait_for(lambda: containerd.ctr("snapshots", "--snapshotter", "cvmfs", "ls",
                                        check=False).returncode == 0, 60, "containerd again")
        containerd.ctr("tasks", "exec", "--exec-id", "e2", cid, "sh", "-c",
                       "echo after > /data/state2")
        assert "after" in containerd.out("tasks", "exec", "--exec-id", "e3", cid, "cat",
                                         "/data/state2")
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        wait_for(lambda: "RUNNING" not in containerd.out("tasks", "ls", check=False), 60,
                 "task stopped")
        containerd.ctr("tasks", "delete", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
    containerd.gc()
    c = Client(daemon.socket)
    assert c.names("kind==active") == []  # the container's snapshot went with it
    c.close()
