"""The bounded soak (issue 11): mixed concurrent Docker work on the driver for a while,
then nothing leaked.

One private driver process (its own plugin name, `<CVMFS_GRAPHDRIVER_TEST_PLUGIN>-<pid>`,
so it collides with no other run on this machine), one private dockerd on it, one private
registry, and one plain directory repository (`dir.repo`, the `dir:` store's own case,
bind-mounted read-only under the driver's CVMFS root; never the CernVM-FS stratum 0).

Set up: busybox, two multi-layer regular images built locally and pushed (the *initial
set*), a thin image of one of them published with `cvmfs-thin convert --store dir:` (in
the initial set too), and three images that live only in the registry (two regular, one
flat thin image) for the pull/rmi work.

Then CVMFS_GRAPHDRIVER_SOAK_WORKERS threads (default 6) for CVMFS_GRAPHDRIVER_SOAK_SECONDS
(default 60, the CI mode; 600 is the full soak) pick operations at random:

    run       docker run --rm of a regular image, its content checked
    thin      docker run --rm of the thin image, the same content as its source
    pull      docker pull of a registry-only image, a run of it, docker rmi
    commit    docker run + commit, a run of the commit (changes checked), rm, rmi
    create    docker create + rm
    diff      docker run (add, change, delete) + docker diff (exact) + rm
    exec      docker run -d, docker exec, rm -f

Every docker command must succeed. The only failures tolerated are documented conflicts
(EXPECTED_CONFLICTS: dockerd refusing to remove an image a container uses); they are
counted and printed, never hidden. The work is arranged so none should happen (each
registry-only image is pulled, run and removed under its own lock; commits get their own
tags), so the count is normally 0.

Every SAMPLE_SECONDS (a 40th of the soak, 0.5 to 5 s) the driver process's RSS,
descriptors (/proc/<pid>/fd), threads (/proc/<pid>/task) and the mounts under its home
(/proc/self/mountinfo) are sampled.

Afterwards, with no container left and the images back to the initial set:

- no mount under the driver home (no container runs, so no layer needs its view);
- descriptors and threads: dockerd's plugin client keeps up to two idle keep-alive
  connections to the driver (Go's http.Transport default MaxIdleConnsPerHost = 2), each
  one socket and one thread in the driver until the driver's REQUEST_TIMEOUT (30 s)
  closes it. So the raw counts may differ from the baseline by up to FD_THREAD_SLACK (2);
  and, exactly: the descriptors that are not sockets equal the baseline's, and threads
  minus open connections equals the baseline's;
- .staging empty, no `.applying` marker, no dangling link in l/;
- RSS flat: the median of the last RSS_WINDOW samples minus the median of the first
  RSS_WINDOW samples after the warm-up (the first quarter of the soak) is below
  RSS_GROWTH_BOUND (10 MB);
- `docker system df` agrees exactly with the driver's accounting: the layer directories in
  the driver home are exactly the cache ids in dockerd's layer database; every image's
  `docker image inspect` GraphDriver data names its own layers in the home; and for every
  layer the size dockerd recorded, `DiffSize` asked of the driver now, and the
  `/system/df` figures (LayersSize, each image's Size = the sum over its layer chain) are
  the same numbers to the byte.

Leaks found (mounts, descriptors, threads, staging entries, markers, links) go to the
resilience tally (tally.leaks) and must be 0. A summary line is printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Set, Tuple

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))

from dockerutil import api_get, build, mounts_below, unique_base  # noqa: E402
from harness import (  # noqa: E402
    Dockerd,
    DockerError,
    DriverProcess,
    Registry,
    import_busybox,
    need,
    need_docker,
    staging_left,
)

pytestmark = pytest.mark.docker

SOAK_SECONDS = float(os.environ.get("CVMFS_GRAPHDRIVER_SOAK_SECONDS", "60"))
WORKERS = int(os.environ.get("CVMFS_GRAPHDRIVER_SOAK_WORKERS", "6"))
SAMPLE_SECONDS = max(0.5, min(5.0, SOAK_SECONDS / 40))  # 1.5 s in the CI mode, 5 s in the full
RSS_WINDOW = 5  # samples in each median
RSS_GROWTH_BOUND = 10 * 1024 * 1024  # bytes
FD_THREAD_SLACK = 2  # dockerd's idle keep-alive connections (see the module docstring)

PLUGIN_NAME = f"{os.environ.get('CVMFS_GRAPHDRIVER_TEST_PLUGIN', 'cvmfs')}-{os.getpid()}"
REPO = "dir.repo"

# dockerd's refusals that concurrency may legitimately cause: counted, reported, allowed.
EXPECTED_CONFLICTS = (
    re.compile(r"image is being used by (running|stopped) container"),
    re.compile(r"unable to remove repository reference .* container .* is using its "
               r"referenced image"),
)

# What every container of the soak images shows: the id, the blobs' digests, and that
# what a later layer deleted stays deleted.
CHECK = ("set -e; cat /soak/id; md5sum /soak/blob*; test ! -e /soak/gone; "
         "test ! -e /soak/tree/sub; ls /soak/tree; echo ok")


def _dockerfile(base: str, nonce: str) -> str:
    return (f"FROM {base}\n"
            f"RUN set -e; mkdir -p /soak/tree/sub; echo {nonce} > /soak/id; "
            "echo gone > /soak/gone; echo z > /soak/tree/sub/z; "
            "head -c 700000 /dev/urandom > /soak/blob1\n"
            "RUN set -e; rm /soak/gone; rm -rf /soak/tree/sub; echo back > /soak/tree/back; "
            "head -c 500000 /dev/urandom > /soak/blob2\n"
            "RUN head -c 300000 /dev/urandom > /soak/blob3\n")


# ---------------------------------------------------------------------------- /proc


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass(frozen=True)
class Handles:
    fds: int
    sockets: int  # of fds, the sockets (the listening one and each connection)
    threads: int

    @property
    def other_fds(self) -> int:
        return self.fds - self.sockets

    @property
    def threads_less_connections(self) -> int:
        # one thread per connection (server.PluginServer); the listener has none
        return self.threads - (self.sockets - 1)

    def __str__(self) -> str:
        return f"{self.fds} fds ({self.sockets} sockets), {self.threads} threads"


def _handles(pid: int) -> Handles:
    fds = sockets = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
        fds += 1
        sockets += target.startswith("socket:")
    return Handles(fds, sockets, len(os.listdir(f"/proc/{pid}/task")))


def _settled_handles(pid: int, timeout: float = 20) -> Handles:
    """The counts once three readings half a second apart agree (a connection closing
    ends its thread a moment after its socket)."""
    deadline = time.monotonic() + timeout
    readings = [_handles(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        readings.append(_handles(pid))
        if len(set(readings[-3:])) == 1 and len(readings) >= 3:
            break
    return readings[-1]


@dataclass
class Sample:
    t: float
    rss: int
    handles: Handles
    mounts: int


# ---------------------------------------------------------------------------- the plugin


def plugin_call(sock: str, method: str, body: Dict) -> Dict:
    """One plugin call on its own connection (closed afterwards: nothing of ours stays
    open in the driver when its descriptors are counted)."""
    conn = http.client.HTTPConnection("localhost", timeout=60)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(60)
    conn.sock.connect(sock)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", f"/{method}", body=data,
                     headers={"Content-Type": "application/json",
                              "Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    if resp.status != 200 or answer.get("Err"):
        raise AssertionError(f"{method} {body}: HTTP {resp.status}: {answer}")
    return answer


# ---------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    driver: DriverProcess
    d: Dockerd
    registry: Registry
    home: str
    expected: Dict[str, str]  # image -> CHECK's output
    local: List[str]  # the regular images of the initial set
    thin: str  # the thin image of the initial set (a thin copy of local[0])
    remote: List[str]  # registry-only images (pull/rmi)
    initial: Tuple[Set[str], Set[str]] = (set(), set())  # (image ids, tags)


def _need_all() -> None:
    need_docker(busybox=True)
    need(importlib.util.find_spec("docker") is not None,
         "cvmfs-thin needs the docker SDK (pip install 'cvmfs-graphdriver[publisher]')")


def _cvmfs_thin(d: Dockerd, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver.publish.cli", *args],
                       env={**os.environ, "DOCKER_HOST": d.host}, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"cvmfs-thin {' '.join(args[:3])} failed ({r.returncode}):\n"
                             f"{r.stderr[-3000:]}\n{r.stdout[-2000:]}")
    return r.stdout


def _image_ids(d: Dockerd) -> Set[str]:
    return set(d.out("images", "-aq", "--no-trunc").split())


def _image_tags(d: Dockerd) -> Set[str]:
    out = d.out("images", "--format", "{{.Repository}}:{{.Tag}}")
    return {t for t in out.split() if "<none>" not in t}


def _check(d: Dockerd, image: str) -> str:
    return d.out("run", "--rm", "--network", "none", image, "sh", "-c", CHECK)


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[Rig]:
    _need_all()
    work = str(tmp_path_factory.mktemp("soak"))
    # The plain directory repository, read-only at <cvmfs root>/dir.repo as the driver
    # reads it; cvmfs-thin writes the store itself.
    store = os.path.join(work, "publisher", REPO)
    cvmfs_root = os.path.join(work, "cvmfs")
    mnt = os.path.join(cvmfs_root, REPO)
    os.makedirs(store)
    os.makedirs(mnt)
    subprocess.run(["mount", "--bind", store, mnt], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", mnt], check=True)
    started: List[Callable[[], None]] = [
        lambda: subprocess.run(["umount", "-l", mnt], check=False)]
    try:
        registry = Registry(os.path.join(work, "registry")).start()
        started.append(registry.stop)
        driver = DriverProcess(PLUGIN_NAME, os.path.join(work, "driver"),
                               ["--cvmfs-root", cvmfs_root, "--repositories", REPO])
        need(not os.path.exists(driver.socket), f"{driver.socket} exists already")
        driver.start()
        started.append(driver.stop)
        d = Dockerd(os.path.join(work, "dockerd"), PLUGIN_NAME).start()
        started.append(d.stop)
        home = os.path.join(d.data_root, PLUGIN_NAME)
        reg = registry.address

        busybox = import_busybox(d, work)
        local = ["soak/r1:1", "soak/r2:1"]
        build(d, os.path.join(work, "ctx-r1"), local[0], _dockerfile(busybox, "r1"))
        base2 = unique_base(d, work, "soak/base2:1")
        build(d, os.path.join(work, "ctx-r2"), local[1], _dockerfile(base2, "r2"))
        expected = {img: _check(d, img) for img in [*local]}
        for img in local:  # pushed, as the regular images are
            d.docker("tag", img, f"{reg}/{img}")
            d.docker("push", f"{reg}/{img}")
            d.docker("rmi", f"{reg}/{img}")

        # The thin image of r1, in the plain directory repository, pushed; stays local.
        thin = f"{reg}/soak/thin:1"
        out = _cvmfs_thin(d, "convert", local[0], "--store", f"dir:{store}", "--repo", REPO,
                          "--tag", thin, "--push")
        assert f"in cvmfs://{REPO}" in out, out
        expected[thin] = expected[local[0]]

        # Registry-only images: two regular (one on busybox, sharing its layer; one on a
        # base of its own) and a flat thin image of r2.
        remote = [f"{reg}/soak/p1:1", f"{reg}/soak/p2:1", f"{reg}/soak/thinflat:1"]
        build(d, os.path.join(work, "ctx-p1"), remote[0], _dockerfile(busybox, "p1"))
        base3 = unique_base(d, work, "soak/base3:1")
        build(d, os.path.join(work, "ctx-p2"), remote[1], _dockerfile(base3, "p2"))
        _cvmfs_thin(d, "convert", local[1], "--store", f"dir:{store}", "--repo", REPO,
                    "--tag", remote[2], "--flat", "--push")
        for img in remote[:2]:
            expected[img] = _check(d, img)
            d.docker("push", img)
        expected[remote[2]] = expected[local[1]]
        assert _check(d, remote[2]) == expected[remote[2]]
        assert _check(d, thin) == expected[thin]
        d.docker("rmi", *remote, "soak/base3:1")
        for img, out in expected.items():
            assert out.endswith("ok\n") and "/soak/blob3" in out, (img, out)

        r = Rig(driver, d, registry, home, expected, [busybox, *local], thin, remote)
        assert not d.out("ps", "-aq").strip()
        r.initial = (_image_ids(d), _image_tags(d))
        yield r
    finally:
        for stop in reversed(started):
            with contextlib.suppress(Exception):
                stop()
        if not os.path.ismount(mnt):
            shutil.rmtree(cvmfs_root, ignore_errors=True)


# ---------------------------------------------------------------------------- the work


@dataclass
class Soak:
    rig: Rig
    deadline: float
    done: Counter = field(default_factory=Counter)
    conflicts: Counter = field(default_factory=Counter)
    errors: List[str] = field(default_factory=list)
    locks: Dict[str, threading.Lock] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.locks = {img: threading.Lock() for img in self.rig.remote}

    # docker, failures classified
    def docker(self, *args: str) -> str:
        try:
            return self.rig.d.out(*args)
        except DockerError as e:
            text = str(e)
            if any(p.search(text) for p in EXPECTED_CONFLICTS):
                with self.lock:
                    self.conflicts[args[0]] += 1
                raise Conflict(text) from None
            raise

    def expect(self, what: str, got: str, want: str) -> None:
        if got != want:
            raise AssertionError(f"{what}: expected {want!r}, got {got!r}")

    # the operations
    def op_run(self, rnd: random.Random, name: str) -> None:
        img = rnd.choice(self.rig.local[1:])
        self.expect(f"run {img}", self.docker("run", "--rm", "--network", "none", img, "sh",
                                              "-c", CHECK), self.rig.expected[img])

    def op_thin(self, rnd: random.Random, name: str) -> None:
        img = self.rig.thin
        self.expect(f"run {img}", self.docker("run", "--rm", "--network", "none", img, "sh",
                                              "-c", CHECK), self.rig.expected[img])

    def op_pull(self, rnd: random.Random, name: str) -> None:
        img = rnd.choice(self.rig.remote)
        with self.locks[img]:
            self.docker("pull", "-q", img)
            try:
                self.expect(f"run pulled {img}",
                            self.docker("run", "--rm", "--network", "none", img, "sh", "-c",
                                        CHECK), self.rig.expected[img])
            finally:
                self.docker("rmi", img)

    def op_commit(self, rnd: random.Random, name: str) -> None:
        img = rnd.choice([*self.rig.local[1:], self.rig.thin])
        tag = f"soak/commit:{name}"
        self.docker("run", "--name", name, "--network", "none", img, "sh", "-c",
                    f"set -e; echo {name} > /soak/committed; rm /soak/id; rm -rf /soak/tree")
        try:
            self.docker("commit", name, tag)
        finally:
            self.docker("rm", name)
        try:
            got = self.docker("run", "--rm", "--network", "none", tag, "sh", "-c",
                              "cat /soak/committed; ls -A /soak; md5sum /soak/blob3")
        finally:
            self.docker("rmi", tag)
        blob3 = next(x for x in self.rig.expected[img].splitlines() if "blob3" in x)
        self.expect(f"commit of {img}", got,
                    f"{name}\nblob1\nblob2\nblob3\ncommitted\n{blob3}\n")

    def op_create(self, rnd: random.Random, name: str) -> None:
        img = rnd.choice([*self.rig.local, self.rig.thin])
        self.docker("create", "--name", name, "--network", "none", img, "true")
        self.docker("rm", name)

    def op_diff(self, rnd: random.Random, name: str) -> None:
        img = rnd.choice([*self.rig.local[1:], self.rig.thin])
        self.docker("run", "--name", name, "--network", "none", img, "sh", "-c",
                    "set -e; mkdir /soak/new; echo x > /soak/new/f; rm /soak/id; "
                    "echo more >> /soak/tree/back")
        try:
            got = sorted(self.docker("diff", name).splitlines())
        finally:
            self.docker("rm", name)
        want = ["A /soak/new", "A /soak/new/f", "C /soak", "C /soak/tree",
                "C /soak/tree/back", "D /soak/id"]
        self.expect(f"docker diff on {img}", "\n".join(got), "\n".join(want))

    def op_exec(self, rnd: random.Random, name: str) -> None:
        img = rnd.choice([*self.rig.local, self.rig.thin])
        self.docker("run", "-d", "--name", name, "--network", "none", img, "sleep", "300")
        try:
            self.expect(f"exec in {img}", self.docker("exec", name, "sh", "-c",
                                                      "echo x > /tmp/x; cat /tmp/x"), "x\n")
        finally:
            self.docker("rm", "-f", name)

    OPS = ("run", "thin", "pull", "commit", "create", "diff", "exec")

    def worker(self, index: int) -> None:
        rnd = random.Random(f"{index}-{uuid.uuid4()}")
        n = 0
        while time.monotonic() < self.deadline:
            kind = rnd.choice(self.OPS)
            n += 1
            name = f"soak-{index}-{n}"
            try:
                getattr(self, f"op_{kind}")(rnd, name)
                with self.lock:
                    self.done[kind] += 1
            except Conflict:
                pass  # counted
            except Exception as e:  # noqa: BLE001 (reported by the test)
                with self.lock:
                    self.errors.append(f"{kind} ({name}): {type(e).__name__}: {e}"[:3000])
                # what a failed operation left behind is removed: the leak checks count
                # the driver's leftovers, not the soak's
                self.rig.d.docker("rm", "-f", name, check=False)
                self.rig.d.docker("rmi", f"soak/commit:{name}", check=False)


class Conflict(Exception):
    pass


def _sampler(rig: Rig, stop: threading.Event, out: List[Sample]) -> None:
    pid = rig.driver.proc.pid  # type: ignore[union-attr]
    t0 = time.monotonic()
    while True:
        out.append(Sample(time.monotonic() - t0, _rss_bytes(pid), _handles(pid),
                          len(mounts_below(rig.home))))
        if stop.wait(SAMPLE_SECONDS):
            return


# ---------------------------------------------------------------------------- checks


def _layerdb(rig: Rig) -> Dict[str, Tuple[str, str, int]]:
    """dockerd's layer database: chain id -> (cache id, parent chain id, recorded size)."""
    root = os.path.join(rig.d.data_root, "image", PLUGIN_NAME, "layerdb", "sha256")
    out = {}
    for chain in os.listdir(root):
        def read(name: str, chain: str = chain) -> str:
            try:
                with open(os.path.join(root, chain, name)) as f:
                    return f.read().strip()
            except FileNotFoundError:
                return ""
        parent = read("parent").split(":", 1)[-1]
        out[chain] = (read("cache-id"), parent, int(read("size") or -1))
    return out


def _home_layers(home: str) -> Set[str]:
    return {n for n in os.listdir(home) if not n.startswith(".") and n != "l"
            and os.path.isdir(os.path.join(home, n))}


def check_accounting(rig: Rig) -> List[str]:
    """`docker system df` and `docker image inspect` against the driver's own accounting;
    returns what disagrees (exact comparisons only)."""
    d, home = rig.d, rig.home
    problems: List[str] = []
    db = _layerdb(rig)
    cache_ids = {c for c, _, _ in db.values()}
    on_disk = _home_layers(home)
    if cache_ids != on_disk:
        problems.append(f"layers in the home but unknown to dockerd: "
                        f"{sorted(on_disk - cache_ids)}; known to dockerd but not in the "
                        f"home: {sorted(cache_ids - on_disk)}")

    # The driver's DiffSize of every layer, against dockerd's record.
    size: Dict[str, int] = {}
    for chain, (cache, parent, recorded) in db.items():
        pcache = db[parent][0] if parent else ""
        size[chain] = plugin_call(rig.driver.socket, "GraphDriver.DiffSize",
                                  {"ID": cache, "Parent": pcache})["Size"]
        if size[chain] != recorded:
            problems.append(f"layer {cache}: dockerd recorded {recorded} bytes, the driver "
                            f"counts {size[chain]}")

    # Each image's GraphDriver data: its top layer's diff in the home, one lower directory
    # per layer below (thin layers count as their planned stack).
    df = api_get(d, "/system/df")
    if df["LayersSize"] != sum(size.values()):
        problems.append(f"/system/df LayersSize {df['LayersSize']} != the driver's "
                        f"{sum(size.values())}")
    for img in df["Images"]:
        info = json.loads(d.out("image", "inspect", img["Id"]))[0]
        gd = info["GraphDriver"]
        if gd["Name"] != PLUGIN_NAME:
            problems.append(f"{img['Id']}: GraphDriver {gd['Name']}")
        chain_ids = _chain_ids([x for x in info["RootFS"]["Layers"]])
        missing = [c for c in chain_ids if c not in db]
        if missing:
            problems.append(f"{img['Id']}: layers not in dockerd's layer db: {missing}")
            continue
        top = db[chain_ids[-1]][0]
        if gd["Data"].get("UpperDir") != os.path.join(home, top, "diff"):
            problems.append(f"{img['Id']}: UpperDir {gd['Data'].get('UpperDir')} is not "
                            f"the top layer's ({top})")
        lowers = [p for p in gd["Data"].get("LowerDir", "").split(":") if p]
        below = {db[c][0] for c in chain_ids[:-1]}
        named = {os.path.relpath(p, home).split(os.sep)[0] for p in lowers
                 if p.startswith(home + os.sep)}
        if named != below:
            problems.append(f"{img['Id']}: LowerDir names {sorted(named)}, the chain below "
                            f"is {sorted(below)}")
        want = sum(size[c] for c in chain_ids)
        if img["Size"] != want:
            problems.append(f"{img['Id']}: /system/df Size {img['Size']} != the driver's "
                            f"{want} over its {len(chain_ids)} layers")
    return problems


def _chain_ids(diff_ids: List[str]) -> List[str]:
    """Chain ids (hex) of a layer list, as the image spec defines them."""
    out: List[str] = []
    chain = ""
    for diff in diff_ids:
        chain = diff if not chain else \
            "sha256:" + hashlib.sha256(f"{chain} {diff}".encode()).hexdigest()
        out.append(chain.split(":", 1)[1])
    return out


def _median(values: List[int]) -> int:
    return int(statistics.median(values)) if values else 0


# ---------------------------------------------------------------------------- the soak


@pytest.mark.timeout(int(SOAK_SECONDS) + 900)
def test_soak(rig: Rig, tally) -> None:
    d, pid = rig.d, rig.driver.proc.pid  # type: ignore[union-attr]
    started = time.monotonic()
    assert not mounts_below(rig.home), mounts_below(rig.home)
    base = _settled_handles(pid)
    mounts_before = len(mounts_below(rig.home))

    soak = Soak(rig, time.monotonic() + SOAK_SECONDS)
    samples: List[Sample] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(rig, stop, samples), daemon=True)
    sampler.start()
    workers = [threading.Thread(target=soak.worker, args=(i,), daemon=True)
               for i in range(WORKERS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(SOAK_SECONDS + 600)
    stop.set()
    sampler.join(10)
    soak_took = time.monotonic() - started
    assert not any(t.is_alive() for t in workers), "a worker is stuck"

    # Back to the initial state: no container, the initial images.
    left = d.out("ps", "-aq").split()
    if left:
        soak.errors.append(f"containers left after the soak: {left}")
        d.docker("rm", "-f", *left, check=False)
    ids, tags = _image_ids(d), _image_tags(d)
    if (ids, tags) != rig.initial:
        soak.errors.append(f"images after the soak differ: extra ids "
                           f"{sorted(ids - rig.initial[0])}, missing ids "
                           f"{sorted(rig.initial[0] - ids)}, extra tags "
                           f"{sorted(tags - rig.initial[1])}, missing tags "
                           f"{sorted(rig.initial[1] - tags)}")

    accounting = check_accounting(rig)

    # Leaks.
    end = _settled_handles(pid)
    mounts_after = mounts_below(rig.home)
    staging = staging_left(rig.home)
    applying = [n for n in _home_layers(rig.home)
                if os.path.exists(os.path.join(rig.home, n, ".applying"))]
    links_dir = os.path.join(rig.home, "l")
    dangling = [n for n in os.listdir(links_dir)
                if not os.path.exists(os.path.join(links_dir, n))]
    leaks = {
        "mounts": len(mounts_after),
        "fds (not sockets)": max(0, end.other_fds - base.other_fds),
        "threads (less connections)": max(0, end.threads_less_connections
                                          - base.threads_less_connections),
        "fds beyond the slack": max(0, end.fds - base.fds - FD_THREAD_SLACK),
        "threads beyond the slack": max(0, end.threads - base.threads - FD_THREAD_SLACK),
        "staging entries": len(staging),
        "applying markers": len(applying),
        "dangling links": len(dangling),
    }
    tally.leaks(sum(leaks.values()))

    # RSS: median of the first samples after the warm-up vs the last samples.
    during = [s for s in samples if s.t >= SOAK_SECONDS / 4]
    first = _median([s.rss for s in during[:RSS_WINDOW]])
    last = _median([s.rss for s in during[-RSS_WINDOW:]])
    peak_mounts = max((s.mounts for s in samples), default=0)
    peak = max(samples, key=lambda s: s.handles.fds).handles if samples else base

    mib = 1024 * 1024
    summary = (
        f"soak: {SOAK_SECONDS:g} s x {WORKERS} workers, {sum(soak.done.values())} operations "
        f"({', '.join(f'{k} {soak.done[k]}' for k in Soak.OPS)}); "
        f"errors {len(soak.errors)}; expected conflicts {sum(soak.conflicts.values())} "
        f"{dict(soak.conflicts) or ''}; RSS first {first / mib:.1f} MiB / last "
        f"{last / mib:.1f} MiB (growth {(last - first) / mib:+.2f} MiB, {len(samples)} "
        f"samples); fds baseline {base.fds} / peak {peak.fds} / end {end.fds} (non-socket "
        f"{base.other_fds} / {end.other_fds}); threads baseline {base.threads} / peak "
        f"{peak.threads} / end {end.threads}; mounts under the home before {mounts_before} "
        f"/ peak {peak_mounts} / after {len(mounts_after)}; leaks {sum(leaks.values())} "
        f"{ {k: v for k, v in leaks.items() if v} or ''}; took {soak_took:.0f} s")
    step = max(1, len(samples) // 20)
    print("\nsoak: driver RSS (MiB) every", f"{step * SAMPLE_SECONDS:g} s:",
          " ".join(f"{s.rss / mib:.1f}" for s in samples[::step]))
    print(summary)

    assert not soak.errors, "\n".join(soak.errors[:20])
    assert sum(soak.done.values()) >= WORKERS, summary
    assert set(soak.done) == set(Soak.OPS) or SOAK_SECONDS < 30, summary
    assert not accounting, "\n".join(accounting)
    assert sum(leaks.values()) == 0, (
        f"{summary}\nmounts: {mounts_after}\nstaging: {staging}\napplying: {applying}\n"
        f"dangling links: {dangling}\nbaseline: {base}\nend: {end}")
    assert len(during) >= 2 * RSS_WINDOW, f"too few samples after the warm-up: {summary}"
    assert last - first < RSS_GROWTH_BOUND, summary
