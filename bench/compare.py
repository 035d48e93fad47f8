#!/usr/bin/env python3
"""The cvmfs graph driver against the built-in overlay2, side by side (issue 10's suite).

    sudo .venv/bin/python bench/compare.py            # full: 5 rounds, < 20 min
    sudo .venv/bin/python bench/compare.py --quick    # smoke run: 2 rounds, small, < 3 min
    sudo .venv/bin/python bench/compare.py --rounds 7 --out /tmp/bench

Starts its own daemons (a dockerd on overlay2; the driver daemon, at --log-level info, and
a dockerd on it; a docker-registry), builds its workloads locally and offline (cached in
/var/tmp/cgd-bench-cache, keyed by their parameters), and measures on both dockerds,
operation by operation in turn (each operation on one driver, then at once on the other;
which goes first alternates round by round), so a slow spell of the machine weighs on
both alike. Besides the ratio of the medians, each round's two figures give a paired
ratio; the table gives their median and spread, and in how many rounds the target held:

  import            `docker import` of one layer (full: 150 MB, 3000 files)
  load, pull        `docker load` of a ~600 MB "Debian with Python" image of 14 layers
                    (made of this host's own Debian 12 files), `docker pull` of it from the
                    local registry; rmi_multi: `docker rmi` of it after the load
  diff, commit, rm  of a container of the imported image that wrote 20 MB and removed a dir
                    (rm: the cvmfs driver frees a container's files just after the call;
                    the next ApplyDiff waits for them, so the build after it pays what is left)
  build             a classic-builder (DOCKER_BUILDKIT=0) RUN on busybox writing 2000 small
                    files and 3 x 20 MB
  rmi               `docker rmi` of the imported, committed and built images
  warm_start        `docker run --rm IMAGE true`, image present (the 14-layer image); a
                    round's figure is the median of warm_repeats (full: 15) starts, each in
                    turn with the other driver's
  deep_load, deep_start   `docker load` of a 125-layer image; its first `run --rm deep true`
  concurrent_start  20 `docker run --rm IMAGE true` at once (the 14-layer image)
  concurrent_pull   4 different images pulled at once from the registry

then thin images on the cvmfs dockerd (`cvmfs-thin convert --store dir:... --push`; the
"CVMFS repository" is a local directory, so this is what the driver adds, not network
savings): pull + first run of the thin image against the same image pulled regularly, 20
thin starts at once, and time against image size (full: 50/150/300 MB, 2 rounds) for
pull, import and thin start. The driver daemon's peak RSS (VmHWM) over the suite, and its
VmRSS after each round.

Writes OUT/latest.json, OUT/latest.md, OUT/ratios.png and OUT/scaling.png (--quick:
quick.json, quick.md, quick-ratios.png, quick-scaling.png); OUT is bench/results unless
--out says otherwise. Exits non-zero if any operation failed. Needs root, dockerd,
docker-registry and busybox-static, and matplotlib for the plots
(scripts/setup.sh installs `driver[test,bench]`). Absolute times drift between machines and
runs: quote the ratios. Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "driver", "tests"))

from benchhost import host_facts  # noqa: E402 (this directory: the script's own)
from harness import Dockerd, DriverProcess, Registry, busybox_rootfs  # noqa: E402

CACHE = "/var/tmp/cgd-bench-cache"
CACHE_VERSION = 1  # bump when a workload's recipe changes
RESULTS = os.path.join(HERE, "results")
REPO = "bench.repo"
DRIVERS = ("overlay2", "cvmfs")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# the targets: cvmfs / overlay2 medians at most this
TARGETS: Dict[str, float] = {
    "import": 1.10, "pull": 1.10, "commit": 1.10, "build": 1.10, "concurrent_pull": 1.10,
    "deep_start": 1.10, "concurrent_start": 1.10,
    "rmi": 1.05, "diff": 1.05, "rm": 1.05, "warm_start": 1.05,
}
RATIO_KEYS = ("import", "pull", "commit", "build", "rmi", "diff", "rm", "warm_start",
              "deep_start", "concurrent_start", "concurrent_pull")


@dataclass(frozen=True)
class Params:
    """The workloads' sizes and the repetitions."""

    rounds: int
    import_mb: int
    import_files: int
    multi_mb: int  # the "Debian with Python" image
    deep_layers: int
    concurrent_starts: int
    concurrent_pulls: int
    concurrent_pull_mb: int
    build_small: int
    build_big: int
    build_big_mb: int
    scaling_mb: Tuple[int, ...]
    scaling_rounds: int
    warm_repeats: int
    files_per_mb: int = 20

    @property
    def thin_mb(self) -> int:
        """The size of the thin-image comparison: the import layer's, if scaled."""
        return self.import_mb if self.import_mb in self.scaling_mb else max(self.scaling_mb)


FULL = Params(rounds=5, import_mb=150, import_files=3000, multi_mb=600, deep_layers=125,
              concurrent_starts=20, concurrent_pulls=4, concurrent_pull_mb=40,
              build_small=2000, build_big=3, build_big_mb=20, scaling_mb=(50, 150, 300),
              scaling_rounds=2, warm_repeats=15)
QUICK = Params(rounds=2, import_mb=50, import_files=1000, multi_mb=100, deep_layers=30,
               concurrent_starts=6, concurrent_pulls=2, concurrent_pull_mb=10,
               build_small=500, build_big=3, build_big_mb=5, scaling_mb=(20, 50),
               scaling_rounds=1, warm_repeats=2)

# figure: (what, unit); cvmfs-only figures are in "thin"
FIGURES: Dict[str, str] = {
    "import": "docker import, one layer",
    "load": "docker load, multi-layer image",
    "pull": "docker pull, multi-layer image, local registry",
    "rmi_multi": "docker rmi of the multi-layer image",
    "diff": "docker diff (20 MB written, a dir removed)",
    "commit": "docker commit of that container",
    "rm": "docker rm of that container (cvmfs frees its files just after)",
    "build": "docker build (classic): RUN writing small files + large ones",
    "rmi": "docker rmi of the imported, committed and built images",
    "warm_start": "docker run --rm IMAGE true, multi-layer image present",
    "deep_load": "docker load of the deep image",
    "deep_start": "docker run --rm deep true (first start)",
    "concurrent_start": "N x docker run --rm IMAGE true at once, multi-layer image",
    "concurrent_pull": "N different images pulled at once",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, **kw)


# ---------------------------------------------------------------------------- workloads


def cached(name: str, key: Dict, ext: str, build: Callable[[str], None]) -> str:
    """CACHE/name-<hash of key>.ext, made by build(tmp path) once and renamed into place."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, key], sort_keys=True).encode())
    path = os.path.join(CACHE, f"{name}-{digest.hexdigest()[:12]}{ext}")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE)
    try:
        t0 = time.monotonic()
        out = os.path.join(tmp, "out")
        build(out)
        os.rename(out, path)
        log(f"built {os.path.basename(path)} in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def fill_data(dest: str, files: int, total_mb: int, seed: int) -> None:
    """`files` files of Pareto-distributed sizes, `total_mb` in all, in nested dirs."""
    rng = random.Random(seed)
    weights = [rng.paretovariate(1.2) for _ in range(files)]
    scale = total_mb * 1e6 / sum(weights)
    for i, w in enumerate(weights):
        d = os.path.join(dest, "data", f"d{i % 50:02d}", f"e{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
            f.write(rng.randbytes(max(1, int(w * scale))))


def data_image_tar(total_mb: int, files: int, seed: int = 42) -> str:
    """A one-layer rootfs tar (for docker import): busybox plus the data."""

    def build(out: str) -> None:
        root = out + ".d"
        busybox_rootfs(root)
        fill_data(root, files, total_mb, seed)
        sh("tar", "-C", root, "--numeric-owner", "-cf", out, ".")
        shutil.rmtree(root)

    return cached("data", {"mb": total_mb, "files": files, "seed": seed}, ".tar", build)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_saved_image(out: str, tag: str, layers: Sequence[Callable[[tarfile.TarFile], None]],
                      cmd: List[str]) -> None:
    """A `docker load` tarball (docker save's format) of the layers, each written by a
    function into its tar."""
    stage = out + ".d"
    os.makedirs(stage)
    diff_ids, names = [], []
    for i, fill in enumerate(layers):
        os.makedirs(os.path.join(stage, f"{i:03d}"))
        name = f"{i:03d}/layer.tar"
        with tarfile.open(os.path.join(stage, name), "w", format=tarfile.PAX_FORMAT) as tf:
            fill(tf)
        diff_ids.append("sha256:" + sha256_file(os.path.join(stage, name)))
        names.append(name)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Env": [PATH_ENV], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": f"bench layer {i}"}
                    for i in range(len(layers))],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with open(os.path.join(stage, config_name), "wb") as f:
        f.write(config)
    with open(os.path.join(stage, "manifest.json"), "w") as f:
        json.dump([{"Config": config_name, "RepoTags": [tag], "Layers": names}], f)
    sh("tar", "-C", stage, "-cf", out, ".")
    shutil.rmtree(stage)


def add_entries(tf: tarfile.TarFile, paths: Sequence[str]) -> None:
    """Host paths into the tar under the same names, with their parent directories."""
    dirs = set()
    for p in paths:
        parent = os.path.dirname(p)
        while parent not in ("/", "") and parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for p in sorted(dirs) + list(paths):
        tf.add(p, arcname=p.lstrip("/"), recursive=False)


def add_symlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
    tf.addfile(ti)


def add_dir(tf: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, mode
    tf.addfile(ti)


def eligible(root: str) -> List[Tuple[str, int]]:
    """World-readable regular files and symlinks under `root` (host secrets stay out), with
    their sizes, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:  # (links to directories are in dirnames)
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out.append((p, 0))
            elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o004:
                out.append((p, st.st_size))
    return out


# the multi-layer image: (layer, host dirs, parts it is split into)
MULTI_SOURCES: List[Tuple[str, List[str], int]] = [
    ("etc", ["/etc"], 1),
    ("dpkg", ["/var/lib/dpkg"], 1),
    ("python3.11", ["/usr/lib/python3.11"], 1),
    ("python3", ["/usr/lib/python3"], 1),
    ("libs", ["/usr/lib/x86_64-linux-gnu"], 2),
    ("bin", ["/usr/bin"], 1),
    ("sbin", ["/usr/sbin"], 1),
    ("locale", ["/usr/share/locale"], 1),
    ("doc", ["/usr/share/doc", "/usr/share/man"], 1),
    ("include", ["/usr/include"], 1),
    ("share", ["/usr/share/perl", "/usr/share/vim", "/usr/share/zoneinfo",
               "/usr/share/i18n"], 1),
]


def essentials() -> List[str]:
    """What `true`, sh and python3 need to start: the binaries and their libraries."""
    bins = ["/usr/bin/true", "/usr/bin/dash", "/usr/bin/python3.11"]
    libs = set()
    for b in bins:
        for line in sh("ldd", b, text=True).stdout.splitlines():
            for p in line.split():
                if p.startswith("/") and os.path.exists(p):
                    # the name under /usr (usrmerge) and what it links to
                    libs.add(os.path.join(os.path.realpath(os.path.dirname(p)),
                                          os.path.basename(p)))
                    libs.add(os.path.realpath(p))
    return sorted(set(bins) | libs)


def water_fill(available: List[int], budget: int) -> List[int]:
    """Split `budget` across layers as evenly as their available content allows."""
    share = [0] * len(available)
    left, todo = budget, sorted(range(len(available)), key=lambda i: available[i])
    for k, i in enumerate(todo):
        share[i] = min(available[i], left // (len(todo) - k))
        left -= share[i]
    return share


def multi_layer_plan(total_mb: int) -> List[List[str]]:
    """The host files of each layer of the multi-layer image, ~total_mb in all."""
    base = essentials()
    taken = set(base)
    groups: List[List[Tuple[str, int]]] = []
    for _, roots, parts in MULTI_SOURCES:
        files = [f for r in roots if os.path.isdir(r) for f in eligible(r) if f[0] not in taken]
        groups.extend(files[k::parts] for k in range(parts))
    budget = total_mb * 1_000_000 - sum(os.path.getsize(p) for p in base)
    shares = water_fill([sum(s for _, s in g) for g in groups], budget)
    plan = [base]
    for g, share in zip(groups, shares):
        chosen, used = [], 0
        for p, size in g:
            if used + size <= share:
                chosen.append(p)
                used += size
        plan.append(chosen)
    return plan


def multi_layer_image(total_mb: int) -> str:
    """The "Debian with Python" image, as a docker load tarball tagged multi:bench."""

    def base_extras(tf: tarfile.TarFile) -> None:
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")):
            add_symlink(tf, link, target)
        add_dir(tf, "lib64")
        add_symlink(tf, "lib64/ld-linux-x86-64.so.2",
                    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        add_symlink(tf, "usr/bin/sh", "dash")
        add_symlink(tf, "usr/bin/python3", "python3.11")
        add_dir(tf, "tmp", 0o1777)

    def build(out: str) -> None:
        plan = multi_layer_plan(total_mb)

        def layer(i: int) -> Callable[[tarfile.TarFile], None]:
            def fill(tf: tarfile.TarFile) -> None:
                add_entries(tf, plan[i])
                if i == 0:
                    base_extras(tf)
            return fill

        def app(tf: tarfile.TarFile) -> None:
            data = b"print('hello from the bench image')\n"
            ti = tarfile.TarInfo("app/main.py")
            ti.size, ti.mode = len(data), 0o644
            add_dir(tf, "app")
            tf.addfile(ti, io.BytesIO(data))

        write_saved_image(out, "multi:bench", [layer(i) for i in range(len(plan))] + [app],
                          ["/usr/bin/python3", "/app/main.py"])

    return cached("multi", {"mb": total_mb, "sources": MULTI_SOURCES}, ".tar", build)


def deep_image(layers: int) -> str:
    """A docker load tarball tagged deep:bench: busybox, then one small file a layer."""

    def build(out: str) -> None:
        root = out + ".bb"
        busybox_rootfs(root)
        open(os.path.join(root, "deep-base"), "w").close()

        def base(tf: tarfile.TarFile) -> None:
            tf.add(root, arcname=".")

        def small(i: int) -> Callable[[tarfile.TarFile], None]:
            def fill(tf: tarfile.TarFile) -> None:
                data = f"layer {i}\n".encode() * 100
                if i == 1:
                    add_dir(tf, "layers")
                ti = tarfile.TarInfo(f"layers/{i:03d}")
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
            return fill

        write_saved_image(out, "deep:bench", [base] + [small(i) for i in range(1, layers)],
                          ["/bin/sh"])
        shutil.rmtree(root)

    return cached("deep", {"layers": layers}, ".tar", build)


@dataclass
class Workloads:
    import_tar: str
    busybox_tar: str
    multi_tar: str
    deep_tar: str
    scaling: Dict[int, str]
    pulls: List[str]  # the concurrently pulled images' rootfs tars


def build_workloads(p: Params) -> Workloads:
    def busybox(out: str) -> None:
        root = out + ".d"
        busybox_rootfs(root)
        sh("tar", "-C", root, "--numeric-owner", "-cf", out, ".")
        shutil.rmtree(root)

    return Workloads(
        import_tar=data_image_tar(p.import_mb, p.import_files),
        busybox_tar=cached("busybox", {}, ".tar", busybox),
        multi_tar=multi_layer_image(p.multi_mb),
        deep_tar=deep_image(p.deep_layers),
        scaling={mb: data_image_tar(mb, p.files_per_mb * mb) for mb in p.scaling_mb},
        pulls=[data_image_tar(p.concurrent_pull_mb, p.files_per_mb * p.concurrent_pull_mb,
                              seed=100 + i) for i in range(p.concurrent_pulls)],
    )


# ---------------------------------------------------------------------------- set-up


def registry_content(p: Params, w: Workloads, d: Dockerd, reg: Registry) -> None:
    """Push the regular images the suite pulls (through the overlay2 dockerd)."""
    d.docker("load", "-i", w.multi_tar, timeout=900)
    pushes = [("multi:bench", "bench/multi:1")]
    for mb, tar in w.scaling.items():
        d.docker("import", tar, f"bench/s{mb}:1", timeout=900)
        pushes.append((f"bench/s{mb}:1", f"bench/s{mb}:1"))
    for i, tar in enumerate(w.pulls):
        d.docker("import", tar, f"bench/cp{i}:1", timeout=900)
        pushes.append((f"bench/cp{i}:1", f"bench/cp{i}:1"))
    for local, name in pushes:
        d.docker("tag", local, f"{reg.address}/{name}")
        d.docker("push", f"{reg.address}/{name}", timeout=900)
        d.docker("rmi", local, f"{reg.address}/{name}")


def start_registry(p: Params, w: Workloads, work: str, ref: Dockerd) -> Registry:
    """A private registry holding the regular images; its storage is cached (a hard-linked
    copy per run, so pushing thin images does not touch the cache)."""
    key = {"multi": os.path.basename(w.multi_tar), "scaling": sorted(w.scaling.items()),
           "pulls": w.pulls}

    def fill(out: str) -> None:
        reg = Registry(out).start()
        try:
            registry_content(p, w, ref, reg)
        finally:
            reg.stop()

    src = cached("registry", key, "", fill)
    root = os.path.join(work, "registry")
    sh("cp", "-al", src, root)
    for name in ("config.yml", "registry.log"):  # rewritten: not through the links
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, name))
    return Registry(root).start()


@dataclass
class Suite:
    """The daemons of one run, the raw figures and the errors."""

    p: Params
    w: Workloads
    work: str
    daemons: Dict[str, Dockerd]
    driver: DriverProcess
    reg: Registry
    store: str
    raw: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    # The same values by round (name -> driver -> round -> seconds), to pair the drivers'
    # figures of one round: they ran one after the other, within seconds.
    by_round: Dict[str, Dict[str, Dict[int, float]]] = field(default_factory=dict)
    round: int = -1  # the round being run (-1: outside the rounds)
    errors: List[Dict] = field(default_factory=list)
    rss_mb: List[float] = field(default_factory=list)
    thin_tags: Dict[int, str] = field(default_factory=dict)
    image_bytes: Dict[str, int] = field(default_factory=dict)
    # Per timed operation on the cvmfs daemon: [layers, unpack, measure, flush] seconds,
    # from the driver's log lines written during the operation.
    splits: Dict[str, List[List[float]]] = field(default_factory=dict)

    def record(self, name: str, which: str, value: float) -> None:
        self.raw.setdefault(name, {}).setdefault(which, []).append(value)
        if self.round >= 0:
            self.by_round.setdefault(name, {}).setdefault(which, {})[self.round] = value

    def timed(self, name: str, which: str, fn: Callable[[], object]) -> Optional[float]:
        """Time fn and record it under name/which; a failure is recorded as an error."""
        settle()
        log_at = os.path.getsize(self.driver.log_path) if which == "cvmfs" else 0
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (every failure is reported, the suite goes on)
            self.error(name, which, e)
            return None
        dt = time.perf_counter() - t0
        self.record(name, which, dt)
        if which == "cvmfs":
            with open(self.driver.log_path, errors="replace") as f:
                f.seek(log_at)
                layers, totals = split_lines(f)
            if layers:
                self.splits.setdefault(name, []).append([layers, *totals])
        return dt

    def error(self, op: str, which: str, e: object) -> None:
        msg = str(e).strip()[-1500:]
        log(f"ERROR {op} ({which}): {msg}")
        self.errors.append({"op": op, "driver": which, "error": msg})

    def quietly(self, which: str, *args: str) -> None:
        """An untimed docker command of the set-up: its failure is an error too."""
        try:
            self.daemons[which].docker(*args, timeout=900)
        except Exception as e:  # noqa: BLE001
            self.error(" ".join(args[:2]), which, e)


def start_suite(p: Params, w: Workloads, work: str, stack: contextlib.ExitStack) -> Suite:
    store = os.path.join(work, "publisher", REPO)
    cvmfs_root = os.path.join(work, "cvmfs")
    mnt = os.path.join(cvmfs_root, REPO)
    os.makedirs(store)
    os.makedirs(mnt)
    sh("mount", "--bind", store, mnt)
    stack.callback(subprocess.run, ["umount", "-l", mnt], check=False)
    name = f"cvmfsbench{os.getpid()}"
    driver = DriverProcess(name, os.path.join(work, "driver"),
                           ["--cvmfs-root", cvmfs_root, "--repositories", REPO,
                            "--log-level", "info"])  # the last --log-level wins
    stack.callback(driver.stop)
    driver.start()
    daemons: Dict[str, Dockerd] = {}
    for which, storage in (("overlay2", "overlay2"), ("cvmfs", name)):
        d = Dockerd(os.path.join(work, f"d-{which}"), storage)
        stack.callback(d.stop)
        daemons[which] = d.start()
    reg = start_registry(p, w, work, daemons["overlay2"])
    stack.callback(reg.stop)
    suite = Suite(p, w, work, daemons, driver, reg, store)
    for which in DRIVERS:
        suite.quietly(which, "import", w.busybox_tar, "bb:bench")
    return suite


# ---------------------------------------------------------------------------- measures


def proc_status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def at_once(argvs: List[List[str]]) -> Tuple[float, List[str]]:
    """Run the commands in parallel: the time to the last one's end, and their errors."""
    errors: List[str] = []

    def one(argv: List[str]) -> None:
        r = subprocess.run(argv, capture_output=True, timeout=900)
        if r.returncode != 0:
            errors.append(f"{' '.join(argv[3:])}: {r.stderr.decode(errors='replace')}")

    threads = [threading.Thread(target=one, args=(a,)) for a in argvs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, errors


def settle() -> None:
    """Before each timed operation: write out what earlier ones left in the page cache.
    Both daemons share one filesystem, and overlay2 flushes nothing it writes while the
    cvmfs driver flushes each layer before reporting it (a syncfs): without this, the
    driver's flush would also write out overlay2's last layers, and an rmi would be timed
    removing never-written files (cheap) on one side and flushed ones on the other. The
    flush the driver does itself is in each operation, and its share is reported
    (`apply_split`)."""
    os.sync()


def concurrent(s: Suite, name: str, which: str, argvs: List[List[str]]) -> None:
    settle()
    dt, errs = at_once(argvs)
    if errs:
        s.error(name, which, f"{len(errs)} of {len(argvs)} failed: " + "; ".join(errs[:3]))
    else:
        s.record(name, which, dt)


def dockerfile_dir(s: Suite) -> str:
    d = os.path.join(s.work, "build")
    if not os.path.isdir(d):
        os.makedirs(d)
        p = s.p
        with open(os.path.join(d, "Dockerfile"), "w") as f:
            f.write("FROM bb:bench\n"
                    f"RUN mkdir /many && cd /many && for i in $(seq 1 {p.build_small}); do "
                    "echo $i > f$i; done && "
                    f"for j in $(seq 1 {p.build_big}); do dd if=/dev/urandom of=/big$j "
                    f"bs=1M count={p.build_big_mb} 2>/dev/null; done\n")
    return d


# The operations of one round on one daemon, as generators that yield after each
# measurement: rounds() steps the two drivers' generators in turn, so each operation is
# measured on both within seconds, and a slow spell of the machine (a shared host's
# disk, say) weighs on both alike instead of on one driver's half of the round.
Steps = Iterator[None]


def container_ops(s: Suite, which: str, r: int) -> Steps:
    """import, diff, commit, rm, build, rmi."""
    d, run = s.daemons[which], ["--network", "none"]
    imp, cname, committed, built = f"imp:{r}", f"c{r}", f"committed:{r}", f"built:{r}"
    s.timed("import", which, lambda: d.docker("import", s.w.import_tar, imp, timeout=900))
    yield
    s.quietly(which, "run", "--name", cname, *run, imp, "sh", "-c",
              "dd if=/dev/zero of=/data/new bs=1M count=20 2>/dev/null; rm -rf /data/d01")
    s.timed("diff", which, lambda: d.docker("diff", cname))
    yield
    s.timed("commit", which, lambda: d.docker("commit", cname, committed))
    yield
    s.timed("rm", which, lambda: d.docker("rm", cname))
    yield
    s.timed("build", which, lambda: d.docker("build", "-q", "--no-cache", *run, "-t", built,
                                             dockerfile_dir(s), timeout=900))
    yield
    s.timed("rmi", which, lambda: d.docker("rmi", imp, committed, built))
    yield


def multi_layer_ops(s: Suite, which: str) -> Steps:
    """load, rmi_multi, pull, warm_start, concurrent_start."""
    d = s.daemons[which]
    remote = f"{s.reg.address}/bench/multi:1"
    s.timed("load", which, lambda: d.docker("load", "-i", s.w.multi_tar, timeout=900))
    yield
    s.timed("rmi_multi", which, lambda: d.docker("rmi", "multi:bench"))
    yield
    s.timed("pull", which, lambda: d.docker("pull", remote, timeout=900))
    yield
    true = ["run", "--rm", "--network", "none", remote, "true"]
    s.quietly(which, *true)  # the first start makes what later ones find
    # The round's figure is the median of warm_repeats starts, each taken in turn with
    # the other driver's. A start is a quarter to a third of a second, most of it the
    # docker CLI, dockerd and runc, and one start's ratio to the other driver's varies by
    # +-8 % (bench/small_ops.py: quartiles 0.94-1.09 over 30 pairs): against a 5 % target
    # a round needs more than a few.
    warm: List[float] = []
    for _ in range(s.p.warm_repeats):
        t0 = time.perf_counter()
        try:
            d.docker(*true)
            warm.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            s.error("warm_start", which, e)
        yield
    if warm:
        s.record("warm_start", which, statistics.median(warm))
    concurrent(s, "concurrent_start", which,
               [["docker", "-H", d.host, *true] for _ in range(s.p.concurrent_starts)])
    yield
    s.quietly(which, "rmi", remote)


def deep_and_pull_ops(s: Suite, which: str) -> Steps:
    """deep_load, deep_start, concurrent_pull."""
    d = s.daemons[which]
    s.timed("deep_load", which, lambda: d.docker("load", "-i", s.w.deep_tar, timeout=900))
    yield
    s.timed("deep_start", which,
            lambda: d.docker("run", "--rm", "--network", "none", "deep:bench", "true"))
    yield
    s.quietly(which, "rmi", "deep:bench")
    names = [f"{s.reg.address}/bench/cp{i}:1" for i in range(s.p.concurrent_pulls)]
    concurrent(s, "concurrent_pull", which, [["docker", "-H", d.host, "pull", n] for n in names])
    yield
    s.quietly(which, "rmi", *names)


def round_ops(s: Suite, which: str, r: int) -> Steps:
    yield from container_ops(s, which, r)
    yield from multi_layer_ops(s, which)
    yield from deep_and_pull_ops(s, which)


def in_turn(steps: List[Steps]) -> None:
    """One step of each in turn, until all are done."""
    live = list(steps)
    while live:
        for g in list(live):
            if next(g, StopIteration) is StopIteration:
                live.remove(g)


def rounds(s: Suite) -> None:
    for r in range(s.p.rounds):
        order = DRIVERS if r % 2 == 0 else DRIVERS[::-1]
        t0 = time.monotonic()
        s.round = r
        in_turn([round_ops(s, which, r) for which in order])
        s.round = -1
        log(f"round {r + 1}/{s.p.rounds} ({' first, '.join(order)} second): "
            f"{time.monotonic() - t0:.0f} s")
        s.rss_mb.append(round(proc_status_mb(s.driver.proc.pid, "VmRSS"), 1))


# ---------------------------------------------------------------------------- thin images


def publish_thin(s: Suite) -> None:
    """A thin image of each scaling size (and of the import image's size), pushed."""
    ours = s.daemons["cvmfs"]
    for mb in s.p.scaling_mb:
        src, thin = f"s{mb}:src", f"{s.reg.address}/bench/thin-s{mb}:1"
        ours.docker("import", s.w.scaling[mb], src, timeout=900)  # the same layer as pushed
        t0 = time.monotonic()
        sh(sys.executable, "-m", "cvmfs_graphdriver.publish.cli", "--docker-host", ours.host,
           "convert", src, "--store", f"dir:{s.store}", "--repo", REPO, "--tag", thin,
           "--push", "--workdir", s.work, timeout=1800)
        log(f"cvmfs-thin convert, {mb} MB: {time.monotonic() - t0:.0f} s")
        ours.docker("rmi", src, thin)  # else the pulls would find the layers locally
        s.thin_tags[mb] = thin


def first_run(d: Dockerd, image: str) -> None:
    d.docker("run", "--rm", "--network", "none", image, "cat", "/bin/busybox",
             "/data/d00/e0/f00000.bin")


def scaling_round(s: Suite, r: int) -> None:
    """Per size: import and pull on both drivers; thin pull + first run on cvmfs."""
    order = DRIVERS if r % 2 == 0 else DRIVERS[::-1]
    for mb in s.p.scaling_mb:
        for which in order:
            regular_at_size(s, which, mb)
        thin_start(s, mb)


def regular_at_size(s: Suite, which: str, mb: int) -> None:
    d, remote = s.daemons[which], f"{s.reg.address}/bench/s{mb}:1"
    s.timed(f"scaling_import_{mb}", which,
            lambda: d.docker("import", s.w.scaling[mb], f"s{mb}:i", timeout=900))
    s.quietly(which, "rmi", f"s{mb}:i")
    t_pull = s.timed(f"scaling_pull_{mb}", which, lambda: d.docker("pull", remote, timeout=900))
    t_run = s.timed(f"scaling_first_run_{mb}", which, lambda: first_run(d, remote))
    if t_pull is not None and t_run is not None:
        s.record(f"scaling_pull_run_{mb}", which, t_pull + t_run)
    if which == "cvmfs":
        s.image_bytes[f"regular {mb} MB"] = int(
            d.out("image", "inspect", "--format", "{{.Size}}", remote, check=False) or 0)
    s.quietly(which, "rmi", remote)


def thin_start(s: Suite, mb: int) -> None:
    ours, thin = s.daemons["cvmfs"], s.thin_tags[mb]
    t_pull = s.timed(f"scaling_pull_{mb}", "thin", lambda: ours.docker("pull", thin))
    t_run = s.timed(f"scaling_first_run_{mb}", "thin", lambda: first_run(ours, thin))
    if t_pull is not None and t_run is not None:
        s.record(f"scaling_pull_run_{mb}", "thin", t_pull + t_run)
    s.image_bytes[f"thin {mb} MB"] = int(ours.out("image", "inspect", "--format", "{{.Size}}",
                                                 thin, check=False) or 0)
    if mb == s.p.thin_mb:
        true = ["docker", "-H", ours.host, "run", "--rm", "--network", "none", thin, "true"]
        concurrent(s, "concurrent_start_thin", "thin",
                   [true for _ in range(s.p.concurrent_starts)])
    s.quietly("cvmfs", "rmi", thin)


# ---------------------------------------------------------------------------- report


def stats(values: List[float]) -> Dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) >= 2 else [v[0]] * 3
    return {"median": round(statistics.median(v), 4), "min": round(v[0], 4),
            "max": round(v[-1], 4), "iqr": round(q[2] - q[0], 4), "n": len(v),
            "values": [round(x, 4) for x in values]}


def ratio(a: Optional[Dict], b: Optional[Dict]) -> Optional[float]:
    if not a or not b or not a["median"]:
        return None
    return round(b["median"] / a["median"], 3)


def figures(s: Suite) -> Dict[str, Dict]:
    out = {}
    for name, what in FIGURES.items():
        by = s.raw.get(name, {})
        f: Dict = {"what": what, "unit": "s"}
        for which in DRIVERS:
            f[which] = stats(by[which]) if by.get(which) else None
        f["ratio"] = ratio(f["overlay2"], f["cvmfs"])
        f["paired"] = paired(s.by_round.get(name, {}), TARGETS.get(name))
        out[name] = f
    return out


def paired(by: Dict[str, Dict[int, float]], target: Optional[float]) -> Optional[Dict]:
    """cvmfs / overlay2 of each round that measured both (the two ran back to back): their
    median, min and max, and in how many rounds the target held."""
    ours, ref = by.get("cvmfs", {}), by.get("overlay2", {})
    values = [ours[r] / ref[r] for r in sorted(set(ours) & set(ref)) if ref[r]]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values),
            "within_target": None if target is None else sum(v <= target for v in values),
            "values": [round(v, 3) for v in values]}


def scaling_doc(s: Suite) -> Dict:
    def series(op: str, which: str) -> Dict[str, Dict]:
        return {str(mb): stats(s.raw[f"scaling_{op}_{mb}"][which]) for mb in s.p.scaling_mb
                if s.raw.get(f"scaling_{op}_{mb}", {}).get(which)}

    return {"sizes_mb": list(s.p.scaling_mb), "rounds": s.p.scaling_rounds,
            "import": {w: series("import", w) for w in DRIVERS},
            "pull": {w: series("pull", w) for w in (*DRIVERS, "thin")},
            "pull_first_run": {w: series("pull_run", w) for w in (*DRIVERS, "thin")}}


def thin_doc(s: Suite) -> Dict:
    mb = s.p.thin_mb
    by = s.raw.get(f"scaling_pull_run_{mb}", {})
    regular = stats(by["cvmfs"]) if by.get("cvmfs") else None
    thin = stats(by["thin"]) if by.get("thin") else None
    conc = s.raw.get("concurrent_start_thin", {}).get("thin")
    return {"image_mb": mb,
            "what": "pull + first run (cat two files) on the cvmfs dockerd: the thin image "
                    "against the same image pulled regularly",
            "pull_first_run": {"regular": regular, "thin": thin, "ratio": ratio(regular, thin)},
            "image_bytes_on_node": s.image_bytes,
            "concurrent_start_thin": stats(conc) if conc else None,
            "concurrent_n": s.p.concurrent_starts}


def machine() -> Dict[str, str]:
    h = host_facts()
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", "/var/lib"],
                        capture_output=True, text=True).stdout.strip()
    return {"kernel": h["kernel"], "cpus": h["cpus"], "cpu_model": h["cpu_model"],
            "mem_gib": h["mem_gib"], "var_lib_fs": fs, "load_before": h["load"]}


def versions() -> Dict[str, object]:
    def out(*argv: str) -> str:
        r = subprocess.run(list(argv), capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    status = out("git", "-C", TOP, "status", "--porcelain")
    return {"dockerd": out("dockerd", "--version"), "docker_cli": out("docker", "--version"),
            "docker_registry": out("docker-registry", "--version"),
            "python": platform.python_version(),
            "driver_commit": out("git", "-C", TOP, "rev-parse", "--short", "HEAD"),
            "tree_dirty": bool(status),
            "driver_src_dirty": bool(out("git", "-C", TOP, "status", "--porcelain",
                                         "--", "driver/src"))}


def report(s: Suite, doc: Dict) -> Dict:
    figs = figures(s)
    doc.update({
        "figures": figs,
        "ratios": {k: figs[k]["ratio"] for k in RATIO_KEYS},
        "targets": TARGETS,
        "peak_rss_mb": round(proc_status_mb(s.driver.proc.pid, "VmHWM"), 1),
        "rss_per_round_mb": s.rss_mb,
        "rss_growth_mb": round(s.rss_mb[-1] - s.rss_mb[0], 1) if s.rss_mb else None,
        "errors": s.errors,
        "thin": thin_doc(s),
        "scaling": scaling_doc(s),
        "apply_split": apply_split(s.driver.log_path),
        "apply_split_by_op": split_by_op(s, figs),
    })
    doc["ratios"]["peak_rss_mb"] = doc["peak_rss_mb"]
    return doc


_APPLIED = re.compile(r"applied \d+ entries .*: ([0-9.]+) s to unpack, ([0-9.]+) s to "
                      r"measure, ([0-9.]+) s to flush")


def split_lines(lines: Iterable[str]) -> Tuple[int, List[float]]:
    """The layers applied in these driver log lines, and their seconds spent reading and
    unpacking the tar, measuring the layer, flushing it to disk."""
    totals = [0.0, 0.0, 0.0]
    layers = 0
    for line in lines:
        m = _APPLIED.search(line)
        if m:
            layers += 1
            for i in range(3):
                totals[i] += float(m.group(i + 1))
    return layers, totals


def apply_split(log_path: str) -> Dict[str, float]:
    """Where the driver's ApplyDiff time went over the whole suite, from its log."""
    with open(log_path, errors="replace") as f:
        layers, totals = split_lines(f)
    whole = sum(totals) or 1.0
    return {"layers": layers, "unpack_s": round(totals[0], 2),
            "measure_s": round(totals[1], 2), "flush_s": round(totals[2], 2),
            "flush_share": round(totals[2] / whole, 3)}


def split_by_op(s: Suite, figs: Dict[str, Dict]) -> Dict[str, Dict]:
    """For each timed operation that applied layers on the cvmfs daemon: medians of its
    layers and of the seconds spent unpacking, measuring and flushing, and the ratio the
    operation would have without the flush (cvmfs median minus the flush median, over
    overlay2's median), which shows what durability costs against what unpacking does."""
    out: Dict[str, Dict] = {}
    for name, rows in s.splits.items():
        layers, unpack, measure, flush = (statistics.median(c) for c in zip(*rows))
        f = figs.get(name, {})
        ours, ref = f.get("cvmfs"), f.get("overlay2")
        out[name] = {
            "n": len(rows), "layers": layers, "unpack_s": round(unpack, 3),
            "measure_s": round(measure, 3), "flush_s": round(flush, 3),
            "ratio_without_flush": (round((ours["median"] - flush) / ref["median"], 3)
                                    if ours and ref and ref["median"] else None),
        }
    return out


def fmt(st: Optional[Dict]) -> str:
    if not st:
        return "–"
    return f"{st['median']:.3g} s ({st['min']:.3g}–{st['max']:.3g}, IQR {st['iqr']:.2g})"


def markdown(doc: Dict) -> str:
    m, v, p = doc["machine"], doc["versions"], doc["params"]
    lines = [
        f"# cvmfs graph driver vs overlay2 ({'quick' if doc['quick'] else 'full'} run)", "",
        f"`{doc['command']}`, {doc['date']}, {doc['duration_s']:.0f} s. "
        f"{m['cpus']} x {m['cpu_model']}, {m['mem_gib']} GiB, kernel {m['kernel']}, "
        f"/var/lib on {m['var_lib_fs']}, load {m['load_before']} before, "
        f"{m.get('load_after', '?')} after. {v['dockerd']}; Python {v['python']}; "
        f"driver {v['driver_commit']}{' (tree dirty)' if v['tree_dirty'] else ''}.", "",
        f"Medians of {p['rounds']} rounds (min–max, IQR). Each operation runs on one "
        "driver, then at once on the other; which goes first alternates round by round. "
        "ratio = cvmfs / overlay2 of the medians (lower is better); paired ratio: of each "
        "round's two figures, their median (min–max) over the rounds. Workloads: one layer of "
        f"{p['import_mb']} MB / {p['import_files']} files; a {p['multi_mb']} MB image of "
        f"{doc['multi_layers']} layers (Debian 12 files); a {p['deep_layers']}-layer image; "
        f"{p['concurrent_starts']} starts and {p['concurrent_pulls']} pulls "
        f"({p['concurrent_pull_mb']} MB each) at once; build: {p['build_small']} small files "
        f"+ {p['build_big']} x {p['build_big_mb']} MB.", "",
        "| operation | overlay2 | cvmfs | ratio | target | met | paired ratio (min–max) | "
        "rounds within target |",
        "| --- | --- | --- | ---: | ---: | --- | --- | ---: |",
    ]
    for name, f in doc["figures"].items():
        target = TARGETS.get(name)
        met = "" if target is None or f["ratio"] is None else (
            "yes" if f["ratio"] <= target else "no")
        r = "–" if f["ratio"] is None else f"{f['ratio']:.2f}"
        pr = f.get("paired")
        pcell = "–" if not pr else f"{pr['median']:.2f} ({pr['min']:.2f}–{pr['max']:.2f})"
        within = "" if not pr or pr["within_target"] is None else \
            f"{pr['within_target']}/{pr['n']}"
        lines.append(f"| {name}: {f['what']} | {fmt(f['overlay2'])} | {fmt(f['cvmfs'])} | "
                     f"{r} | {target or ''} | {met} | {pcell} | {within} |")
    t = doc["thin"]
    pr, sizes = t["pull_first_run"], t["image_bytes_on_node"]
    regular_b, thin_b = (sizes.get(f"{k} {t['image_mb']} MB") for k in ("regular", "thin"))
    lines += [
        "", f"Driver daemon: peak RSS (VmHWM) {doc['peak_rss_mb']} MB over the suite; VmRSS "
        f"after each round {doc['rss_per_round_mb']} MB (growth first → last round: "
        f"{doc['rss_growth_mb']} MB).", "",
        "ApplyDiff in the driver, {layers} layers over the suite: {unpack_s} s reading and "
        "unpacking, {measure_s} s measuring, {flush_s} s flushing to disk before each layer "
        "is reported ({pct:.0f} % of it; overlay2 does not flush). Each timed operation "
        "starts after a `sync`, so neither driver pays for what the other left unwritten."
        .format(pct=100 * doc["apply_split"]["flush_share"], **doc["apply_split"]), "",
        *split_table(doc), "",
        f"## Thin images ({t['image_mb']} MB image, `dir:` layer store)", "",
        "| | regular pull | thin | thin / regular |", "| --- | --- | --- | ---: |",
        f"| pull + first run | {fmt(pr['regular'])} | {fmt(pr['thin'])} | {pr['ratio']} |",
        f"| image bytes on the node | {regular_b} | {thin_b} | |",
        f"| {t['concurrent_n']} thin starts at once | | {fmt(t['concurrent_start_thin'])} | |",
        "", "## Time against image size", "",
        "| MB | import overlay2 | import cvmfs | pull overlay2 | pull cvmfs | thin pull + "
        "first run | regular pull + first run (cvmfs) |",
        "| ---: | --- | --- | --- | --- | --- | --- |",
    ]
    sc = doc["scaling"]
    for mb in map(str, sc["sizes_mb"]):
        cells = [sc["import"]["overlay2"].get(mb), sc["import"]["cvmfs"].get(mb),
                 sc["pull"]["overlay2"].get(mb), sc["pull"]["cvmfs"].get(mb),
                 sc["pull_first_run"]["thin"].get(mb), sc["pull_first_run"]["cvmfs"].get(mb)]
        lines.append(f"| {mb} | " + " | ".join(fmt(c) for c in cells) + " |")
    lines += ["", f"Errors: {len(doc['errors'])}."]
    lines += [f"- {e['op']} ({e['driver']}): {e['error'][:300]}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def split_table(doc: Dict) -> List[str]:
    rows = doc.get("apply_split_by_op") or {}
    if not rows:
        return []
    lines = ["Per operation (medians; the ratio without the flush takes the flush median "
             "off the cvmfs median):", "",
             "| operation | layers | unpack | measure | flush | ratio | ratio without flush |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        ratio_ = doc["figures"].get(name, {}).get("ratio")
        lines.append(f"| {name} | {r['layers']:g} | {r['unpack_s']:.3g} s | "
                     f"{r['measure_s']:.3g} s | {r['flush_s']:.3g} s | "
                     f"{'–' if ratio_ is None else f'{ratio_:.2f}'} | "
                     f"{'–' if r['ratio_without_flush'] is None else r['ratio_without_flush']}"
                     " |")
    return lines


def plots(doc: Dict, prefix: str, out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in RATIO_KEYS if doc["ratios"].get(k) is not None]
    values = [doc["ratios"][k] for k in names]
    colors = ["tab:green" if v <= TARGETS[k] else "tab:red" for k, v in zip(names, values)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(names, values, color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    for i, (k, v) in enumerate(zip(names, values)):
        ax.hlines(TARGETS[k], i - 0.45, i + 0.45, color="black", linestyle="--",
                  label="target" if i == 0 else None)
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("cvmfs / overlay2 (median)")
    ax.set_title(f"cvmfs graph driver vs overlay2, {doc['date'][:10]}, medians of "
                 f"{doc['params']['rounds']} rounds; driver peak RSS {doc['peak_rss_mb']} MB")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    paths = [os.path.join(out, f"{prefix}ratios.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    sc = doc["scaling"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("import", "docker import", sc["import"]), ("pull", "docker pull", sc["pull"]),
              ("thin", "thin start: pull + first run", sc["pull_first_run"]))
    for ax, (_, title, data) in zip(axes, panels):
        for which, series in data.items():
            if not series:
                continue
            xs = [int(k) for k in series]
            med = [series[k]["median"] for k in series]
            err = [[series[k]["median"] - series[k]["min"] for k in series],
                   [series[k]["max"] - series[k]["median"] for k in series]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=which)
        ax.set_title(title)
        ax.set_xlabel("image size (MB)")
        ax.set_ylabel("s (median, min–max)")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, f"{prefix}scaling.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_results(doc: Dict, out: str, quick: bool) -> None:
    os.makedirs(out, exist_ok=True)
    base, prefix = ("quick", "quick-") if quick else ("latest", "")
    with open(os.path.join(out, f"{base}.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, f"{base}.md"), "w") as f:
        f.write(markdown(doc))
    for path in [os.path.join(out, f"{base}.json"), os.path.join(out, f"{base}.md"),
                 *plots(doc, prefix, out)]:
        log(f"wrote {path}")


# ---------------------------------------------------------------------------- main


def unmount_below(path: str) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for mp in sorted((m for m in points if m.startswith(path + "/")), reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


@contextlib.contextmanager
def workdir() -> Iterator[str]:
    work = tempfile.mkdtemp(prefix="cgd-bench-", dir="/var/tmp")
    try:
        yield work
    finally:
        unmount_below(work)
        subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, small workloads")
    ap.add_argument("--rounds", type=int, help="rounds (default: 5; --quick: 2)")
    ap.add_argument("--out", default=RESULTS, help="where the results go (bench/results)")
    return ap.parse_args()


def run(p: Params, doc: Dict) -> Tuple[Dict, int]:
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        w = build_workloads(p)
        log(f"workloads ready ({time.monotonic() - t0:.0f} s)")
        work = stack.enter_context(workdir())
        s = start_suite(p, w, work, stack)
        log(f"daemons and registry up ({time.monotonic() - t0:.0f} s)")
        rounds(s)
        log(f"rounds done ({time.monotonic() - t0:.0f} s)")
        publish_thin(s)
        for r in range(p.scaling_rounds):
            scaling_round(s, r)
        log(f"thin and scaling done ({time.monotonic() - t0:.0f} s)")
        if s.driver.proc is None or s.driver.proc.poll() is not None:
            s.error("driver", "cvmfs", "the driver daemon is not running any more")
        doc["multi_layers"] = multi_layers(w.multi_tar)
        report(s, doc)
        return doc, len(s.errors)


def multi_layers(tar: str) -> int:
    with tarfile.open(tar) as tf:
        f = tf.extractfile("./manifest.json")
        return len(json.load(f)[0]["Layers"]) if f else 0


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/compare.py needs root (dockerd, mounts)")
    p = QUICK if args.quick else FULL
    if args.rounds:
        p = Params(**{**asdict(p), "rounds": args.rounds})

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    os.environ["DOCKER_BUILDKIT"] = "0"  # the classic builder, dockerd 20.10's default
    started = time.monotonic()
    doc: Dict = {"command": "sudo .venv/bin/python bench/compare.py "
                            + " ".join(sys.argv[1:]),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "quick": args.quick, "machine": machine(), "versions": versions(),
                 "params": asdict(p)}
    doc, n_errors = run(p, doc)
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["load_after"] = machine()["load_before"]
    write_results(doc, args.out, args.quick)
    log(f"done in {doc['duration_s']:.0f} s; ratios: {json.dumps(doc['ratios'])}")
    if n_errors:
        log(f"{n_errors} operation(s) failed: see errors in the results")
    return 1 if n_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
