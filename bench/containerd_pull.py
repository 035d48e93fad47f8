#!/usr/bin/env python3
"""Pull + first run on the containerd path: the cvmfs snapshotter against containerd's
built-in overlayfs snapshotter, side by side in one run.

An image (busybox + FILES files, MB megabytes in all, one layer) is pushed to a local
registry and its layers published with `cvmfs-thin convert --digests registry` into a
repository tree (the CVMFS stand-in: a local directory, so this measures what the
snapshotter adds, not network savings). Each round, alternating, for each variant the
image is removed from a private containerd, garbage-collected, pulled with the CRI's
remote-snapshotter annotations (lazypull, as Docker >= 24 and Kubernetes pull) and run
once (`cat` of two files):

  overlayfs   containerd's built-in snapshotter: downloads and unpacks every layer
  cvmfs       our snapshotter, the layers published: downloads none of them
  cvmfs-plain our snapshotter with no repository allowed: downloads and unpacks like
              overlayfs (what the snapshotter costs for images that are not published)

    sudo .venv/bin/python bench/containerd_pull.py [--rounds 5] [--files 3000] [--mb 150]

Prints medians, ratios to overlayfs and the bytes the registry served per pull; with
--write, records them in bench/containerd.json and bench/RESULTS.md. Quote the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "driver", "tests"))
sys.path.insert(0, os.path.join(TOP, "driver", "tests", "snapshotter"))

from compare import make_rootfs  # noqa: E402
from containerd_harness import NAMESPACE, Containerd  # noqa: E402
from harness import Dockerd, Registry, tar_of  # noqa: E402
from sntools import Daemon  # noqa: E402

REPO = "bench.example.org"
SECTION = "## Pull + first run on the containerd path (snapshotter vs overlayfs)"


def build_go_tool(name: str) -> str:
    out = subprocess.run(["bash", os.path.join(TOP, "scripts", "build-go-tool.sh"), name],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def served_bytes(log: str) -> int:
    """Bytes of blob bodies the registry sent (its access log's response sizes)."""
    return sum(int(n) for n in re.findall(
        r'"GET [^"]*/blobs/sha256:[0-9a-f]+ HTTP/[^"]*" 200 (\d+)', log))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--mb", type=int, default=150)
    ap.add_argument("--write", action="store_true", help="record in bench/ (json, RESULTS.md)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/containerd_pull.py needs root (containerd, mounts)")

    work = tempfile.mkdtemp(prefix="cgd-ctrd-bench-", dir="/var/tmp")
    cvmfs_root = os.path.join(work, "cvmfs")
    os.makedirs(os.path.join(cvmfs_root, REPO))
    lazypull = build_go_tool("lazypull")
    reg = Registry(os.path.join(work, "registry")).start()
    builder = Dockerd(os.path.join(work, "d-overlay2"), "overlay2").start()
    published = Daemon(os.path.join(work, "sn-published"),
                       extra=["--cvmfs-root", cvmfs_root, "--repositories", REPO]).start()
    plain = Daemon(os.path.join(work, "sn-plain")).start()
    c_pub = Containerd(os.path.join(work, "ctrd-pub"), published.socket).start()
    c_plain = Containerd(os.path.join(work, "ctrd-plain"), plain.socket).start()
    variants = {"overlayfs": (c_pub, "overlayfs"), "cvmfs": (c_pub, "cvmfs"),
                "cvmfs-plain": (c_plain, "cvmfs")}
    times: Dict[str, List[float]] = {v: [] for v in variants}
    served: Dict[str, List[int]] = {v: [] for v in variants}
    log_path = os.path.join(reg.root, "registry.log")
    try:
        print(f"building the image: {args.files} files, {args.mb} MB ...", file=sys.stderr)
        rootfs = make_rootfs(os.path.join(work, "rootfs"), args.files, args.mb)
        ref = f"{reg.address}/bench/app:1"
        builder.docker("import", "-c", 'CMD ["/bin/sh"]', "-", ref, input=tar_of(rootfs))
        builder.docker("push", ref)
        subprocess.run([os.path.join(TOP, ".venv", "bin", "cvmfs-thin"), "--docker-host",
                        builder.host, "convert", ref, "--digests", "registry",
                        "--store", f"dir:{cvmfs_root}/{REPO}", "--repo", REPO,
                        "--tag", "bench/app-thin:1"], check=True, capture_output=True)
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for v in order:
                containerd, snapshotter = variants[v]
                containerd.ctr("images", "rm", ref, check=False)
                containerd.gc()
                start = os.path.getsize(log_path)
                t0 = time.perf_counter()
                subprocess.run([lazypull, "-address", containerd.address, "-namespace",
                                NAMESPACE, "-snapshotter", snapshotter, "-plain-http", ref],
                               check=True, capture_output=True)
                containerd.ctr("run", "--rm", "--snapshotter", snapshotter, ref, f"b{r}{v}",
                               "cat", "/bin/busybox", "/data/d00/e0/f00000.bin")
                times[v].append(time.perf_counter() - t0)
                with open(log_path, errors="replace") as f:
                    f.seek(start)
                    served[v].append(served_bytes(f.read()))
                print(f"round {r + 1} {v}: {times[v][-1]:.2f} s, "
                      f"{served[v][-1] / 1e6:.1f} MB from the registry", file=sys.stderr)
    finally:
        for c in (c_pub, c_plain):
            c.stop()
        for d in (published, plain):
            d.stop()
        builder.stop()
        reg.stop()
        subprocess.run(["rm", "-rf", work], check=False)

    base = statistics.median(times["overlayfs"])
    rows = []
    for v in variants:
        m = statistics.median(times[v])
        rows.append({"variant": v, "median_s": round(m, 3), "min_s": round(min(times[v]), 3),
                     "max_s": round(max(times[v]), 3), "ratio": round(m / base, 2),
                     "registry_mb": round(statistics.median(served[v]) / 1e6, 1)})
    table = ["| variant | pull + first run, median (min–max) | / overlayfs "
             "| MB from the registry |",
             "| --- | --- | --- | --- |"]
    table += [f"| {r['variant']} | {r['median_s']:.2f} s ({r['min_s']:.2f}–{r['max_s']:.2f}) | "
              f"{r['ratio']:.2f} | {r['registry_mb']} |" for r in rows]
    print("\n".join(table))
    if args.write:
        doc = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
               "kernel": platform.release(), "rounds": args.rounds, "files": args.files,
               "mb": args.mb, "results": rows,
               "containerd": subprocess.run(["containerd", "--version"], capture_output=True,
                                            text=True).stdout.strip()}
        with open(os.path.join(HERE, "containerd.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        results_md = os.path.join(HERE, "RESULTS.md")
        with open(results_md) as f:
            text = f.read()
        section = (f"{SECTION}\n\n`sudo .venv/bin/python bench/containerd_pull.py --rounds "
                   f"{args.rounds} --files {args.files} --mb {args.mb} --write`, "
                   f"{doc['date']}, {doc['containerd']}. One {args.mb} MB layer of "
                   f"{args.files} files; the repository is a local directory (what the "
                   "snapshotter adds, not network savings).\n\n" + "\n".join(table) + "\n")
        if SECTION in text:
            head, _, rest = text.partition(SECTION)
            nxt = rest.find("\n## ")
            text = head + section + (rest[nxt:] if nxt >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + section
        with open(results_md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
