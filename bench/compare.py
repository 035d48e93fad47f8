#!/usr/bin/env python3
"""Side-by-side benchmark: the cvmfs graph driver against the built-in overlay2.

Starts two private dockerds in the same run (one `-s overlay2`, one `-s cvmfs` with the
driver daemon), does the same operations on each, alternating A/B for several rounds,
and reports medians and the ratio cvmfs/overlay2 (lower is better for times). Thin
images are measured against the same image pulled regularly, from a local registry.

    sudo .venv/bin/python bench/compare.py [--rounds 5] [--files 4000] [--mb 200]

Needs root, dockerd, docker-registry and busybox-static (scripts/setup.sh installs them).
Absolute times drift between machines and runs: quote the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "driver", "tests"))

from harness import (  # noqa: E402
    Dockerd,
    DriverProcess,
    Registry,
    busybox_rootfs,
    tar_of,
)


def make_rootfs(dest: str, files: int, total_mb: int) -> str:
    """busybox plus `files` files of mixed sizes (`total_mb` in all) in nested dirs."""
    busybox_rootfs(dest)
    rng = random.Random(42)
    weights = [rng.paretovariate(1.2) for _ in range(files)]
    scale = total_mb * 1e6 / sum(weights)
    for i, w in enumerate(weights):
        d = os.path.join(dest, "data", f"d{i % 50:02d}", f"e{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
            f.write(rng.randbytes(max(1, int(w * scale))))
    return dest


def dtime(d: Dockerd, *args: str, input: Optional[bytes] = None) -> float:
    t0 = time.perf_counter()
    d.docker(*args, input=input)
    return time.perf_counter() - t0


def driver_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--mb", type=int, default=200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/compare.py needs root (dockerd, mounts)")

    work = tempfile.mkdtemp(prefix="cgd-bench-", dir="/var/tmp")
    store = os.path.join(work, "publisher", "bench.repo")
    cvmfs_root = os.path.join(work, "cvmfs")
    os.makedirs(store)
    os.makedirs(os.path.join(cvmfs_root, "bench.repo"))
    subprocess.run(["mount", "--bind", store, os.path.join(cvmfs_root, "bench.repo")],
                   check=True)
    driver = DriverProcess("cvmfsbench", os.path.join(work, "driver"),
                           ["--cvmfs-root", cvmfs_root, "--repositories", "bench.repo"])
    driver.start()
    ours = Dockerd(os.path.join(work, "d-cvmfs"), "cvmfsbench").start()
    ref = Dockerd(os.path.join(work, "d-overlay2"), "overlay2").start()
    reg = Registry(os.path.join(work, "registry")).start()
    daemons = {"overlay2": ref, "cvmfs": ours}
    results: Dict[str, Dict[str, List[float]]] = {}

    def record(name: str, which: str, value: float) -> None:
        results.setdefault(name, {}).setdefault(which, []).append(value)

    try:
        print(f"building a rootfs: {args.files} files, {args.mb} MB ...", file=sys.stderr)
        rootfs = make_rootfs(os.path.join(work, "rootfs"), args.files, args.mb)
        image_tar = os.path.join(work, "image.tar")
        with open(image_tar, "wb") as f:
            f.write(tar_of(rootfs))
        bb = tar_of(busybox_rootfs(os.path.join(work, "bb")))
        for d in daemons.values():
            d.docker("import", "-", "bb:bench", input=bb)

        with open(image_tar, "rb") as f:
            data = f.read()
        for r in range(args.rounds):
            for which, d in daemons.items():
                big, cname, committed = f"big:{r}", f"c{r}", f"committed:{r}"
                record("import 1 layer (s)", which, dtime(d, "import", "-", big, input=data))
                record("docker run --rm true (s)", which,
                       dtime(d, "run", "--rm", "--network", "none", "bb:bench", "true"))
                record("run, read every file (s)", which, dtime(
                    d, "run", "--rm", "--network", "none", big, "sh", "-c",
                    "find /data -type f | xargs cat > /dev/null"))
                d.docker("run", "--name", cname, "--network", "none", big, "sh", "-c",
                         "dd if=/dev/zero of=/data/new bs=1M count=20 2>/dev/null; "
                         "rm -rf /data/d01")
                record("docker diff (s)", which, dtime(d, "diff", cname))
                record("docker commit (s)", which, dtime(d, "commit", cname, committed))
                d.docker("rm", cname)
                record("rmi (s)", which, dtime(d, "rmi", big, committed))

        # Thin image vs the same image pulled regularly (bytes moved and time to start).
        ours.docker("import", "-", "big:src", input=data)
        regular = f"{reg.address}/bench/regular:1"
        ours.docker("tag", "big:src", regular)
        ours.docker("push", regular)
        thin = f"{reg.address}/bench/thin:1"
        subprocess.run([sys.executable, "-m", "cvmfs_graphdriver.publish.cli",
                        "--docker-host", ours.host, "convert", "big:src",
                        "--store", f"dir:{store}", "--repo", "bench.repo", "--tag", thin,
                        "--push"], check=True, capture_output=True)
        ours.docker("rmi", "big:src")  # else the regular pull would find its layer locally
        for _ in range(args.rounds):
            for which, ref_name in (("regular", regular), ("thin", thin)):
                ours.docker("rmi", "-f", ref_name, check=False)
                t_pull = dtime(ours, "pull", ref_name)
                t_run = dtime(ours, "run", "--rm", "--network", "none", ref_name, "cat",
                              "/bin/busybox", "/data/d00/e0/f00000.bin")
                size = int(ours.out("image", "inspect", "--format", "{{.Size}}", ref_name))
                record("pull + first run (s)", which, t_pull + t_run)
                record("image bytes on node", which, size)
        rss = driver_rss_kb(driver.proc.pid) if driver.proc else 0
    finally:
        for d in daemons.values():
            for tag in d.out("images", "-q", check=False).split():
                d.docker("rmi", "-f", tag, check=False)
            d.stop()
        driver.stop()
        reg.stop()
        subprocess.run(["umount", "-l", os.path.join(cvmfs_root, "bench.repo")], check=False)
        subprocess.run(["rm", "-rf", work], check=False)

    print(f"\n{args.rounds} rounds, medians; image: {args.files} files, {args.mb} MB, 1 layer; "
          f"ratio = second/first\n")
    print(f"{'measure':32} {'first':>14} {'second':>14} {'ratio':>8}")
    for name, by in results.items():
        (a_name, a), (b_name, b) = list(by.items())
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:32} {a_name + ' ' + format(ma, '.3g'):>14} "
              f"{b_name + ' ' + format(mb, '.3g'):>14} {mb / ma if ma else float('nan'):8.2f}")
    print(f"\ndriver daemon peak RSS: {rss / 1024:.1f} MiB; this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
