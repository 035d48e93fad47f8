"""kill -9 of the graph driver during a pull, a run, a commit, a removal; a dockerd restart; a
simulated reboot (issue 11).

A private dockerd runs on the driver under a plugin name of this run only, with a private
registry holding a multi-layer image of incompressible data (a pull takes long enough to be
interrupted). For every operation: start it through the docker CLI, SIGKILL the driver
after a seeded random delay spanning the operation's measured duration, start the driver
again on the same socket (as systemd's Restart= would), then

  * retry the operation through docker: it must succeed;
  * `docker images` / `docker ps -a` are consistent: every image saves (`docker save`
    verifies each layer's content against its diff id) and exports as the reference;
    every container inspects; every running container answers `docker exec`;
  * every layer the driver reports (a layer directory without `.applying`) belongs to
    dockerd, nothing is left in `.staging`, and every mount under the home is a running
    container's, counted as mounted by the driver (adopted).

Lost bytes (committed data that reads back different) and leaks (orphan layers, staging
entries, stray mounts) go to the resilience tally and must be zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

import pytest
from dockerutil import build, driver_home, inspect, layer_dirs, mount_points, mounts_below
from harness import (
    Dockerd,
    DriverProcess,
    Registry,
    busybox_rootfs,
    export_manifest,
    need_docker,
    staging_left,
    tar_of,
)

from cvmfs_graphdriver.config import state_file
from cvmfs_graphdriver.layout import Layout

pytestmark = pytest.mark.docker

ROUNDS = max(1, int(os.environ.get("CVMFS_GRAPHDRIVER_KILL_ROUNDS", "2")))
PLUGIN_NAME = os.environ.get("CVMFS_GRAPHDRIVER_TEST_PLUGIN", "cvmfs")

LAYERS_MB = (5, 5, 4, 4, 3)  # incompressible data per layer, on top of busybox
BIG_DOCKERFILE = "FROM kill/base:1\nRUN mkdir /data\n" + "".join(
    f"RUN dd if=/dev/urandom of=/data/blob{i} bs=1M count={mb} 2>/dev/null && "
    f"echo layer{i} > /data/layer{i}.txt" + (f" && rm /data/layer{i - 1}.txt" if i else "")
    + "\n" for i, mb in enumerate(LAYERS_MB))


@dataclass
class Stack:
    work: str
    driver: DriverProcess
    dockerd: Dockerd
    registry: Registry
    ref: str = ""  # the big image in the registry
    image_id: str = ""
    reference: Dict[str, tuple] = field(default_factory=dict)  # its export manifest
    survivor_image: str = "kill/survivor:1"
    kills: List[str] = field(default_factory=list)
    # test_driver_refs_kill.py's strict xfail, when a kill hits it here (see check_consistent)

    @property
    def home(self) -> str:
        return driver_home(self.dockerd)

    def d(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.dockerd.docker(*args, **kw)

    def out(self, *args: str, **kw) -> str:
        return self.dockerd.out(*args, **kw)


def _export(st: Stack, image: str) -> Dict[str, tuple]:
    cid = st.out("create", "--network", "none", image, "true").strip()
    try:
        return export_manifest(st.d("export", cid).stdout)
    finally:
        st.d("rm", "-f", cid, check=False)


def _kill_processes_naming(text: str) -> None:
    """SIGKILL the processes whose command line names `text` (this stack's dockerd's own
    containerd and shims: the private root is in their arguments)."""
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if text.encode() in argv and b"pytest" not in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _unmount_below(path: str) -> None:
    for point in sorted(mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_docker(busybox=True)
    work = str(tmp_path_factory.mktemp("gdkill"))
    # A plugin name of this run only: no other test run on the machine shares its socket,
    # its state file or its home.
    name = f"{PLUGIN_NAME}k{os.getpid()}"
    driver = DriverProcess(name, os.path.join(work, "driver")).start()
    registry = Registry(os.path.join(work, "registry")).start()
    dockerd = Dockerd(os.path.join(work, "dockerd"), name)
    st = Stack(work, driver, dockerd, registry)
    try:
        dockerd.start()
        root = busybox_rootfs(os.path.join(work, "rootfs"))
        dockerd.docker("import", "-c", 'CMD ["/bin/sh"]', "-", "kill/base:1", input=tar_of(root))
        with open(os.path.join(root, "etc", "image-id"), "w") as f:
            f.write(f"survivor {uuid.uuid4()}\n")  # a base layer shared with nothing
        dockerd.docker("import", "-c", 'CMD ["/bin/sh"]', "-", st.survivor_image,
                       input=tar_of(root))
        st.ref = f"{registry.address}/kill/big:1"
        build(dockerd, os.path.join(work, "ctx"), st.ref, BIG_DOCKERFILE)
        st.image_id = st.out("image", "inspect", "-f", "{{.Id}}", st.ref).strip()
        st.reference = _export(st, st.ref)
        assert len(json.loads(st.out("image", "inspect", st.ref))[0]["RootFS"]["Layers"]) \
            == 2 + len(LAYERS_MB)
        st.d("push", st.ref)
        st.d("rmi", st.ref, "kill/base:1")
        yield st
    finally:
        print("\n".join(st.kills))
        with contextlib.suppress(Exception):
            for cid in st.out("ps", "-aq", timeout=60).split():
                st.d("rm", "-f", cid, check=False, timeout=60)
        dockerd.stop()
        _kill_processes_naming(dockerd.root)
        driver.stop()
        registry.stop()
        _unmount_below(work)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_file(driver.socket))


# ----------------------------------------------------------------------------- checks


def _dockerd_layers(st: Stack) -> Set[str]:
    """Every driver layer dockerd knows: images' cache ids, containers' mount and init ids."""
    db = os.path.join(st.dockerd.data_root, "image", st.dockerd.storage_driver, "layerdb")
    out: Set[str] = set()
    for sub, names in (("sha256", ("cache-id",)), ("mounts", ("mount-id", "init-id"))):
        base = os.path.join(db, sub)
        for entry in os.listdir(base) if os.path.isdir(base) else []:
            for n in names:
                with contextlib.suppress(FileNotFoundError), \
                        open(os.path.join(base, entry, n)) as f:
                    out.add(f.read().strip())
    return out


def _running(st: Stack) -> Dict[str, dict]:
    ids = st.out("ps", "-q", "--no-trunc").split()
    return {c["Id"]: c for c in inspect(st.dockerd, *ids)} if ids else {}


def check_consistent(st: Stack, tally, scratch: str, when: str, *,
                     inherited: bool = False) -> None:
    """What the module docstring lists; leaks to the tally, then asserted. `inherited`:
    the state an earlier test of this module left (the stack is shared): asserted, not
    tallied again (that test counted its leaks), and named so a leak is not blamed on
    the test that found it."""
    home = st.home
    layout = Layout(home)
    problems: List[str] = []
    leaks = 0

    # every layer reported as existing is dockerd's and complete; nothing half-made stays
    reported = set()
    for name in layer_dirs(home):
        if os.path.exists(layout.applying_marker(name)):
            problems.append(f"layer {name} still carries .applying after recovery")
            leaks += 1
        else:
            reported.add(name)
    orphans = reported - _dockerd_layers(st)
    if orphans:
        problems.append(f"layers no image or container of dockerd uses: {sorted(orphans)}")
        leaks += len(orphans)
    staging = staging_left(layout.home)
    if staging:
        problems.append(f".staging not empty: {staging}")
        leaks += len(staging)

    # mounts: exactly the running containers', and the driver counts them (adopted)
    running = _running(st)
    merged = {c["GraphDriver"]["Data"]["MergedDir"] for c in running.values()}
    stray = set(mounts_below(home)) - merged
    if stray:
        problems.append(f"mounts under the home no running container uses: {sorted(stray)}")
        leaks += len(stray)
    # a running container's root unmounted (the Put of a commit interrupted by a kill;
    # test_driver_refs_kill.py) fails here
    missing = merged - set(mount_points())
    assert not missing, f"{when}: running containers' roots unmounted: {sorted(missing)}"
    rows = {k: v for k, v in st.dockerd.info()["DriverStatus"]}
    assert int(rows["Mounted Layers"]) == len(mounts_below(home)), (when, rows)
    assert int(rows["Layers"]) == len(layer_dirs(home)), (when, rows)

    # containers: every one inspects, every running one answers
    for cid in st.out("ps", "-aq", "--no-trunc").split():
        (c,) = inspect(st.dockerd, cid)
        assert c["GraphDriver"]["Name"] == st.dockerd.storage_driver
    for cid in running:
        r = st.d("exec", cid, "cat", "/ok", check=False)
        assert r.stdout == b"ok\n", f"{when}: exec in {cid[:12]}: {r.stderr!r}"

    # images: each saves (dockerd verifies every layer against its diff id)
    for image in st.out("images", "-q", "--no-trunc").split():
        path = os.path.join(scratch, "save.tar")
        st.d("save", "-o", path, image)
        os.unlink(path)
    if st.d("image", "inspect", st.ref, check=False).returncode == 0:
        got = _export(st, st.ref)
        lost = sum(v[4] for k, v in st.reference.items() if got.get(k) != v)
        tally.lost(lost)
        assert got == st.reference, f"{when}: {st.ref} exports differently ({lost} bytes)"

    if not inherited:
        tally.leaks(leaks)
    assert not problems, f"{when}: " + "; ".join(problems)


# ----------------------------------------------------------------------------- kills


def kill_during(st: Stack, rng, op: str, argv: List[str], delay: float) -> Tuple[int, str]:
    """Run `docker argv...`, SIGKILL the driver after `delay`, start it again on the same
    socket after a short random pause (systemd's Restart=); the first try's status."""
    p = subprocess.Popen(["docker", "-H", st.dockerd.host, *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(delay)
    in_flight = p.poll() is None
    st.driver.kill9()
    time.sleep(rng.uniform(0.05, 0.8))
    st.driver.start()
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"docker {' '.join(argv)} hung after the driver's kill") from None
    outcome = "ok" if p.returncode == 0 else f"failed: {err.decode(errors='replace').strip()}"
    line = (f"graph driver: kill -9 during {op} after {delay:.3f}s "
            f"({'in flight' if in_flight else 'already finished'}); first try {outcome[:300]}")
    st.kills.append(line)
    print(line, flush=True)
    return p.returncode, outcome


def _timed(st: Stack, *argv: str) -> float:
    t = time.monotonic()
    st.d(*argv)
    return time.monotonic() - t


def _delays(rng, duration: float) -> List[float]:
    """Spread over the operation: one early, the rest anywhere up to just past its end."""
    return [rng.uniform(0, duration * 0.3) if i == 0 else rng.uniform(0, duration * 1.1)
            for i in range(ROUNDS)]


def _exists(st: Stack, kind: str, ref: str) -> bool:
    return st.d(kind, "inspect", ref, check=False).returncode == 0


def _start_survivor(st: Stack, name: str) -> str:
    cid = st.out("run", "-d", "--name", name, "--network", "none", st.survivor_image, "sh",
                 "-c", "echo ok > /ok; exec sleep 100000").strip()
    deadline = time.monotonic() + 20
    while st.d("exec", cid, "test", "-e", "/ok", check=False).returncode:
        assert time.monotonic() < deadline, "the survivor never wrote /ok"
        time.sleep(0.1)
    return cid


def _survived(st: Stack, tally, ok: bool) -> None:
    tally.fault(survived=ok)
    assert ok


def test_kill9_driver_during_pull_run_commit_remove(stack, rng, tally, tmp_path):
    st = stack
    scratch = str(tmp_path)
    survivor = _start_survivor(st, "survivor")
    check_consistent(st, tally, scratch, "before any kill")

    # --------------------------------------------------------------------- pull
    pull_time = _timed(st, "pull", st.ref)
    st.d("rmi", st.ref)
    for i, delay in enumerate(_delays(rng, pull_time)):
        kill_during(st, rng, f"pull #{i}", ["pull", st.ref], delay)
        st.d("pull", st.ref)  # the retry: must succeed
        assert st.out("image", "inspect", "-f", "{{.Id}}", st.ref).strip() == st.image_id
        check_consistent(st, tally, scratch, f"after the kill during pull #{i}")
        _survived(st, tally, True)
        st.d("rmi", st.ref)
        check_consistent(st, tally, scratch, f"after removing the pull #{i}")
    st.d("pull", st.ref)

    # --------------------------------------------------------------------- run / start
    run_args = ["--network", "none", st.ref, "sh", "-c", "echo ok > /ok; exec sleep 100000"]
    run_time = _timed(st, "run", "-d", "--name", "run-timing", *run_args)
    st.d("rm", "-f", "run-timing")
    for i, delay in enumerate(_delays(rng, run_time)):
        name = f"run{i}"
        kill_during(st, rng, f"run #{i}", ["run", "-d", "--name", name, *run_args], delay)
        if not _exists(st, "container", name):
            st.d("run", "-d", "--name", name, *run_args)
        elif not inspect(st.dockerd, name)[0]["State"]["Running"]:
            st.d("start", name)
        deadline = time.monotonic() + 20
        while st.d("exec", name, "test", "-e", "/ok", check=False).returncode:
            assert time.monotonic() < deadline, f"{name} never wrote /ok"
            time.sleep(0.1)
        check_consistent(st, tally, scratch, f"after the kill during run #{i}")
        _survived(st, tally, True)

    # --------------------------------------------------------------------- commit
    def writer(i: int) -> Tuple[str, str]:
        name = f"committer{i}"
        st.d("run", "-d", "--name", name, *run_args)
        st.d("exec", name, "sh", "-c", f"dd if=/dev/urandom of=/data/commit{i} bs=1M count=6 "
             f"2>/dev/null && rm /data/blob1 && echo gone > /data/layer4.txt")
        digest = st.out("exec", name, "sha256sum", f"/data/commit{i}").split()[0]
        return name, digest

    name, _ = writer(99)
    commit_time = _timed(st, "commit", name, "kill/commit-timing:1")
    st.d("rm", "-f", name)
    st.d("rmi", "kill/commit-timing:1")
    for i, delay in enumerate(_delays(rng, commit_time)):
        name, digest = writer(i)
        tag = f"kill/commit:{i}"
        kill_during(st, rng, f"commit #{i}", ["commit", name, tag], delay)
        if not _exists(st, "image", tag):
            st.d("commit", name, tag)
        r = st.d("run", "--rm", "--network", "none", tag, "sh", "-c",
                 f"sha256sum /data/commit{i}; cat /data/layer4.txt; ls /data/blob1 || true")
        lines = r.stdout.decode().split("\n")
        ok = lines[0].split()[:1] == [digest] and lines[1] == "gone"
        tally.lost(0 if ok else 6 << 20)
        assert ok, f"commit #{i}: the committed image reads back {r.stdout!r}"
        assert b"No such file" in r.stderr, r.stderr
        check_consistent(st, tally, scratch, f"after the kill during commit #{i}")
        _survived(st, tally, True)

    # --------------------------------------------------------------------- rm / rmi
    for i in range(ROUNDS):
        name, tag = f"committer{i}", f"kill/commit:{i}"
        rm_time = 0.3
        kill_during(st, rng, f"rm -f #{i}", ["rm", "-f", name], rng.uniform(0, rm_time))
        if _exists(st, "container", name):
            st.d("rm", "-f", name)
        kill_during(st, rng, f"rmi #{i}", ["rmi", tag], rng.uniform(0, rm_time))
        if _exists(st, "image", tag):
            st.d("rmi", tag)
        assert not _exists(st, "container", name) and not _exists(st, "image", tag)
        check_consistent(st, tally, scratch, f"after the kills during rm/rmi #{i}")
        _survived(st, tally, True)

    # the survivor ran through every kill; its mount was adopted each time: its Put
    # (stop) releases it, and it starts again
    (c,) = inspect(st.dockerd, survivor)
    assert c["State"]["Running"], c["State"]
    merged = c["GraphDriver"]["Data"]["MergedDir"]
    st.d("stop", "-t", "0", survivor)
    assert merged not in mount_points(), "the adopted mount outlived its container"
    st.d("start", survivor)
    check_consistent(st, tally, scratch, "after stopping and starting the survivor")

    # --------------------------------------------------------------------- dockerd restart
    st.dockerd.restart()  # no live-restore: its containers stop; Cleanup unmounts
    assert mounts_below(st.home) == []
    for cid in st.out("ps", "-aq").split():
        if inspect(st.dockerd, cid)[0]["Config"]["Cmd"][-1].endswith("sleep 100000"):
            st.d("start", cid)
    check_consistent(st, tally, scratch, "after a dockerd restart")


# ----------------------------------------------------------------------------- reboot


def test_simulated_reboot(stack, rng, tally, tmp_path):
    """dockerd and the driver die with every container; every mount is gone (a reboot);
    both start again: every image runs, every container starts again."""
    st = stack
    scratch = str(tmp_path)
    # A failed test_kill9_... leaves its leak in the shared stack (e.g. the layer of a Create
    # whose answer the kill cut off, test_driver_create_kill.py): not the reboot's.
    check_consistent(st, tally, scratch, "before the reboot, as an earlier test of this "
                     "module left the stack", inherited=True)
    if not _exists(st, "image", st.ref):
        st.d("pull", st.ref)
    for name in ("reboot-a", "reboot-b"):
        if not _exists(st, "container", name):
            st.d("run", "-d", "--name", name, "--network", "none", st.ref, "sh", "-c",
                 "echo ok > /ok; exec sleep 100000")
    created = st.out("create", "--name", "reboot-created", "--network", "none", st.ref,
                     "true").strip()
    pids = [c["State"]["Pid"] for c in _running(st).values()]
    containers = set(st.out("ps", "-aq", "--no-trunc").split())
    images = set(st.out("images", "-q", "--no-trunc").split())
    assert pids and mounts_below(st.home)

    # power off: every process of the stack dies at once, nothing is cleaned up
    st.driver.kill9()
    assert st.dockerd.proc is not None
    st.dockerd.proc.kill()
    st.dockerd.proc.wait(30)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _kill_processes_naming(st.dockerd.root)
    time.sleep(0.5)
    # ... and the boot: no mount survives, /run is empty
    _unmount_below(st.work)
    assert mounts_below(st.work) == []
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_file(st.driver.socket))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(st.driver.socket)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(st.dockerd.root, "dockerd.pid"))
    # /run is a tmpfs: the exec root (/run/docker) is empty at boot. Left, its
    # containerd/containerd.pid names the killed containerd, whose pid may be a zombie
    # not yet reaped or already reused (pid_max 32768): dockerd then takes containerd for
    # "still running", never starts one and fails ("timeout waiting for containerd").
    shutil.rmtree(os.path.join(st.dockerd.root, "exec"), ignore_errors=True)

    st.driver.start()
    st.dockerd.start()
    ok = set(st.out("ps", "-aq", "--no-trunc").split()) == containers and \
        set(st.out("images", "-q", "--no-trunc").split()) == images
    for cid in containers - {created}:
        assert not inspect(st.dockerd, cid)[0]["State"]["Running"]
        st.d("start", cid)
    check_consistent(st, tally, scratch, "after the reboot")
    r = st.d("run", "--rm", "--network", "none", st.ref, "cat", "/data/layer4.txt")
    ok = ok and r.stdout == b"layer4\n"
    for image in st.out("images", "--format", "{{.Repository}}:{{.Tag}}").split():
        st.d("run", "--rm", "--network", "none", image, "true")
    st.d("start", "reboot-created")
    _survived(st, tally, ok)
