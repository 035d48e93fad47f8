"""kill -9 of the snapshotter during a pull, a prepare (container create), a commit and a
removal, with containerd restarted at the end (issue 11).

A private containerd loads the snapshotter as its `cvmfs` proxy plugin and pulls from a
private registry an image of busybox and layers of incompressible data. For every
operation: start it with `ctr`, SIGKILL the snapshotter after a seeded random delay
spanning the operation's measured duration, start it again on the same socket, then

  * retry the operation through containerd: it must succeed;
  * after containerd's garbage collection, containerd's snapshot list and the
    snapshotter's metadata agree exactly (names, kinds, parents);
  * every committed snapshot is whole: the image's files read back with the checksums
    they were made with, a committed snapshot's file reads back as written;
  * nothing is left in the snapshotter's staging directory, no stray mount under its home;
  * a task started before the kills keeps running and answers `ctr tasks exec`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

import pytest
from containerd_harness import Containerd, OciImage, busybox_layer, layer_tar, unmount_below
from harness import Registry, need, require_tool
from sntools import Client, Daemon, need_grpc, wait_for

from cvmfs_graphdriver import mounts
from cvmfs_graphdriver.snapshotter.layout import STAGING_DIR

ROUNDS = max(1, int(os.environ.get("CVMFS_GRAPHDRIVER_KILL_ROUNDS", "2")))
SN = "cvmfs"
KINDS = {1: "View", 2: "Active", 3: "Committed"}
BLOB_MB = (4, 4, 3)


@dataclass
class Stack:
    work: str
    daemon: Daemon
    containerd: Containerd
    registry: Registry
    ref: str = ""
    blobs: Dict[str, str] = field(default_factory=dict)  # /data/<name> -> sha256
    kills: List[str] = field(default_factory=list)

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.containerd.ctr(*args, **kw)

    def out(self, *args: str, **kw) -> str:
        return self.containerd.out(*args, **kw)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need(os.geteuid() == 0, "needs root (containerd, mounts)")
    need_grpc()
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "docker-registry"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    need(os.path.exists("/bin/busybox"), "busybox-static is not installed")
    require_tool("ctr")
    work = str(tmp_path_factory.mktemp("snkill"))
    daemon = Daemon(os.path.join(work, "snapshotter")).start()
    containerd = Containerd(os.path.join(work, "containerd"), daemon.socket)
    registry = Registry(os.path.join(work, "registry"))
    st = Stack(work, daemon, containerd, registry)
    try:
        registry.start()
        containerd.start()
        layers = [busybox_layer(work)]
        for i, mb in enumerate(BLOB_MB):
            data = os.urandom(mb << 20)
            st.blobs[f"blob{i}"] = hashlib.sha256(data).hexdigest()
            layers.append(layer_tar([("data", "dir"), (f"data/blob{i}", "file", data)]))
        st.ref = f"{registry.address}/kill/sn:1"
        archive = os.path.join(work, "image.tar")
        with open(archive, "wb") as f:
            f.write(OciImage(st.ref, layers).archive())
        st.ctr("images", "import", "--no-unpack", archive)
        st.ctr("images", "push", "--plain-http", st.ref)
        _forget_image(st)
        yield st
    finally:
        print("\n".join(st.kills))
        containerd.stop()
        daemon.stop()
        registry.stop()
        unmount_below(work)


def _forget_image(st: Stack) -> None:
    """The image and everything it brought (content, snapshots) gone from containerd."""
    st.ctr("images", "rm", "--sync", st.ref, check=False)
    st.containerd.gc()


# ----------------------------------------------------------------------------- checks


def _theirs(st: Stack) -> Set[Tuple[str, str, str]]:
    rows = st.out("snapshots", "--snapshotter", SN, "ls").splitlines()[1:]
    out = set()
    for row in rows:
        f = row.split()
        out.add((f[0], f[1] if len(f) == 3 else "", f[-1]))
    return out


def _ours(st: Stack) -> Set[Tuple[str, str, str]]:
    """The snapshotter's metadata, its keys without containerd's "<ns>/<id>/" prefix."""
    def key(name: str) -> str:
        return name.split("/", 2)[2] if name.count("/") >= 2 else name

    c = Client(st.daemon.socket)
    try:
        return {(key(i.name), key(i.parent) if i.parent else "", KINDS.get(i.kind, "?"))
                for i in c.list()}
    finally:
        c.close()


def check_agree(st: Stack, tally, when: str, survivor: str = "") -> None:
    st.containerd.gc()
    theirs, ours = _theirs(st), _ours(st)
    leaks = len(ours - theirs)
    staging = os.path.join(st.daemon.home, STAGING_DIR)
    left = os.listdir(staging) if os.path.isdir(staging) else []
    leaks += len(left)
    in_use = {m for m in mounts.mounts_under(st.daemon.home)}
    # containerd mounts its tasks' roots below its own state dir, never below our home
    leaks += len(in_use)
    tally.leaks(leaks)
    assert theirs - ours == set(), f"{when}: containerd lists what the snapshotter lost"
    assert ours - theirs == set(), f"{when}: the snapshotter keeps what containerd dropped"
    assert not left, f"{when}: staging left {left}"
    assert not in_use, f"{when}: mounts under the snapshotter's home: {in_use}"
    if survivor:
        assert "RUNNING" in st.out("tasks", "ls")
        r = st.ctr("tasks", "exec", "--exec-id", f"x{time.monotonic_ns()}", survivor, "cat",
                   "/ok")
        assert r.stdout == b"ok\n", f"{when}: the survivor answers {r.stdout!r}"


def check_image(st: Stack, tally, when: str) -> None:
    """The image's files read back as made: every committed layer is whole."""
    cid = f"read-{time.monotonic_ns()}"
    out = st.out("run", "--rm", "--snapshotter", SN, st.ref, cid, "sh", "-c",
                 "cd /data && sha256sum blob*")
    got = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    lost = sum(mb << 20 for i, mb in enumerate(BLOB_MB)
               if got.get(f"blob{i}") != st.blobs[f"blob{i}"])
    tally.lost(lost)
    assert got == st.blobs, f"{when}: the image reads back {got}"


# ----------------------------------------------------------------------------- kills


def kill_during(st: Stack, rng, op: str, argv: List[str], delay: float) -> int:
    p = subprocess.Popen(["ctr", "--address", st.containerd.address, "--namespace",
                          "cgd-test", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    in_flight = p.poll() is None
    st.daemon.kill9()
    time.sleep(rng.uniform(0.05, 0.8))
    st.daemon.start()
    try:
        _, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"ctr {' '.join(argv)} hung after the snapshotter's kill") from None
    outcome = "ok" if p.returncode == 0 else f"failed: {err.decode(errors='replace').strip()}"
    line = (f"snapshotter: kill -9 during {op} after {delay:.3f}s "
            f"({'in flight' if in_flight else 'already finished'}); first try {outcome[:300]}")
    st.kills.append(line)
    print(line, flush=True)
    wait_reconnected(st)
    return p.returncode


def wait_reconnected(st: Stack) -> None:
    """containerd's proxy reconnects by itself, after a gRPC back-off; wait until a call
    reaches the snapshotter again (`snapshots ls` reads containerd's own database only)."""
    probe = f"probe-{time.monotonic_ns()}"
    wait_for(lambda: st.ctr("snapshots", "--snapshotter", SN, "prepare", probe,
                            check=False).returncode == 0, 60, "containerd through the snapshotter")
    r = st.ctr("snapshots", "--snapshotter", SN, "rm", probe, check=False)
    # containerd's collector may have taken it first (no lease holds it; see _read_from)
    assert r.returncode == 0 or b"not found" in r.stderr, r.stderr.decode()


def _delays(rng, duration: float) -> List[float]:
    return [rng.uniform(0, duration * 0.3) if i == 0 else rng.uniform(0, duration * 1.1)
            for i in range(ROUNDS)]


def _timed(st: Stack, *argv: str) -> float:
    t = time.monotonic()
    st.ctr(*argv)
    return time.monotonic() - t


def _has(st: Stack, key: str) -> bool:
    return any(k == key for k, _, _ in _theirs(st))


def _write_into(st: Stack, key: str, data: bytes) -> None:
    """Mount the active snapshot `key` as containerd would and write /payload into it."""
    target = os.path.join(st.work, f"mnt-{key}")
    os.makedirs(target, exist_ok=True)
    st.ctr("snapshots", "--snapshotter", SN, "mounts", target, key)
    cmd = st.out("snapshots", "--snapshotter", SN, "mounts", target, key).strip()
    subprocess.run(["sh", "-c", cmd], check=True)
    try:
        with open(os.path.join(target, "payload"), "wb") as f:
            f.write(data)
    finally:
        subprocess.run(["umount", target], check=True)


def _read_from(st: Stack, name: str) -> bytes:
    """The payload in the committed snapshot `name`, through a view of it. containerd's
    garbage collector may remove a snapshot that no lease holds - ctr's views hold none -
    whenever a deletion has scheduled a collection (ctr 1.6 cannot give a lease); a view
    collected under the read is made again (containerd's doing, not the snapshotter's).

    A view the collector takes leaves `name` unremovable through containerd 1.6: its
    collector deletes a snapshot's record but not the parent's link to it (metadata/gc.go
    remove), and `ctr snapshots rm name` then fails "cannot remove snapshot with child".
    Its scheduler collects only after a deletion (or a hundred other changes), so one
    collection run to its end first (the commit just made deleted its active snapshot)
    leaves none due while the view exists (gc/scheduler/scheduler.go)."""
    view = f"view-{name}"
    target = os.path.join(st.work, f"mnt-{view}")
    os.makedirs(target, exist_ok=True)
    st.containerd.gc()
    for attempt in range(3):
        st.ctr("snapshots", "--snapshotter", SN, "view", view, name)
        try:
            r = st.ctr("snapshots", "--snapshotter", SN, "mounts", target, view, check=False)
            if r.returncode != 0 and b"not found" in r.stderr and attempt < 2:
                continue  # collected before it was mounted
            cmd = r.stdout.decode().strip()
            if r.returncode != 0:
                raise RuntimeError(f"ctr snapshots mounts {view}: {r.stderr.decode()}")
            subprocess.run(["sh", "-c", cmd], check=True)
            try:
                with open(os.path.join(target, "payload"), "rb") as f:
                    return f.read()
            finally:
                subprocess.run(["umount", target], check=True)
        finally:
            r = st.ctr("snapshots", "--snapshotter", SN, "rm", view, check=False)
            assert r.returncode == 0 or b"not found" in r.stderr, r.stderr.decode()
    raise AssertionError(f"{view}: collected by containerd three times before it was read")


def test_kill9_snapshotter_during_pull_prepare_commit_remove(stack, rng, tally):
    st = stack
    pull = ["images", "pull", "--plain-http", "--snapshotter", SN, st.ref]

    # --------------------------------------------------------------------- pull
    pull_time = _timed(st, *pull)
    _forget_image(st)
    for i, delay in enumerate(_delays(rng, pull_time)):
        kill_during(st, rng, f"pull #{i}", pull, delay)
        st.ctr(*pull)  # the retry
        check_agree(st, tally, f"after the kill during pull #{i}")
        check_image(st, tally, f"after the kill during pull #{i}")
        tally.fault(survived=True)
        if i < ROUNDS - 1:
            _forget_image(st)

    survivor = "survivor"
    st.ctr("run", "-d", "--snapshotter", SN, st.ref, survivor, "sh", "-c",
           "echo ok > /ok; exec sleep 100000")
    wait_for(lambda: st.ctr("tasks", "exec", "--exec-id", "w", survivor, "test", "-e", "/ok",
                            check=False).returncode == 0, 30, "the survivor's /ok")

    # --------------------------------------------------------------------- prepare
    create = ["containers", "create", "--snapshotter", SN, st.ref]
    prep_time = _timed(st, *create, "timing")
    st.ctr("containers", "delete", "timing")
    for i, delay in enumerate(_delays(rng, prep_time)):
        name = f"prep{i}"
        kill_during(st, rng, f"prepare (container create) #{i}", [*create, name], delay)
        if st.ctr("containers", "info", name, check=False).returncode != 0:
            st.ctr(*create, name)
        assert _has(st, name), f"container {name} has no snapshot"
        check_agree(st, tally, f"after the kill during prepare #{i}", survivor)
        st.ctr("tasks", "start", "-d", name)  # the prepared snapshot is usable
        st.ctr("tasks", "kill", "-s", "SIGKILL", name)
        wait_for(lambda n=name: "RUNNING" not in [
            r.split()[-1] for r in st.out("tasks", "ls").splitlines()[1:] if r.split()[0] == n],
            30, f"{name} stopped")
        st.ctr("tasks", "delete", name)
        st.ctr("containers", "delete", name)
        tally.fault(survived=True)

    # --------------------------------------------------------------------- commit
    parent = next(p for k, p, _ in _theirs(st) if k == survivor)  # the image's top layer
    for i in range(ROUNDS + 1):
        key, name = f"work{i}", f"commit{i}"
        data = os.urandom(2 << 20)
        st.ctr("snapshots", "--snapshotter", SN, "prepare", key, parent)
        _write_into(st, key, data)
        if i == 0:  # the timing run
            commit_time = _timed(st, "snapshots", "--snapshotter", SN, "commit", name, key)
            continue
        delay = rng.uniform(0, commit_time * 1.5)
        kill_during(st, rng, f"commit #{i}", ["snapshots", "--snapshotter", SN, "commit",
                                              name, key], delay)
        if not _has(st, name):
            assert _has(st, key), f"commit #{i}: neither {key} nor {name} exists"
            st.ctr("snapshots", "--snapshotter", SN, "commit", name, key)
        assert not _has(st, key)
        got = _read_from(st, name)
        lost = 0 if got == data else len(data)
        tally.lost(lost)
        assert got == data, f"commit #{i}: the committed snapshot reads back otherwise"
        check_agree(st, tally, f"after the kill during commit #{i}", survivor)
        tally.fault(survived=True)

    # --------------------------------------------------------------------- remove
    for i in range(1, ROUNDS + 1):
        name = f"commit{i}"
        kill_during(st, rng, f"remove #{i}", ["snapshots", "--snapshotter", SN, "rm", name],
                    rng.uniform(0, commit_time * 1.5))
        if _has(st, name):
            st.ctr("snapshots", "--snapshotter", SN, "rm", name)
        assert not _has(st, name)
        check_agree(st, tally, f"after the kill during remove #{i}", survivor)  # GC'd
        assert name not in {k for k, _, _ in _ours(st)}
        tally.fault(survived=True)
    st.ctr("snapshots", "--snapshotter", SN, "rm", "commit0")

    # --------------------------------------------------------------------- containerd restart
    with contextlib.suppress(Exception):
        st.ctr("tasks", "kill", "-s", "SIGKILL", survivor)
    st.containerd.stop()
    st.containerd.start()
    wait_reconnected(st)
    check_agree(st, tally, "after a containerd restart")
    check_image(st, tally, "after a containerd restart")
    st.ctr(*pull)
