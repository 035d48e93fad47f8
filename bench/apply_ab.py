"""Layer unpacking (archive.apply_tar, what ApplyDiff spends its time in) of two source
trees of the driver, side by side: an A/B for a change to the unpacking code.

    .venv/bin/python bench/apply_ab.py TREE_A TREE_B [--rounds 8] [--work /var/tmp/apply-ab]

Each tree is a checkout of this repository (e.g. `git worktree add /tmp/b BRANCH`). Two
layer tars are made once in the work directory (seeded, so the same bytes every time):
150 MB in 3000 files (3 of 15 MB), and 80 MB in 20000 small files (3 of 8 MB), each in
100 or 800 directories and in directory order, as tars of a tree are. For each layer, after
one unmeasured run of each tree, the trees alternate (which goes first alternates too),
each run a fresh process that applies the tar read through a pipe (as a request body
arrives) into an empty directory, after a `sync`. It prints each tree's median wall,
user and system seconds and the pairwise ratio B / A. No flush after the apply (the
driver's syncfs costs both trees the same).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Tuple

LAYERS = {  # name: (files, total bytes, directories)
    "150MB-3000-files": (3000, 150 << 20, 100),
    "80MB-20000-files": (20000, 80 << 20, 800),
}


def make_layer(path: str, files: int, total: int, dirs: int) -> None:
    rnd = random.Random(7)
    big = [total // 10] * 3  # a few large files; the rest small, sizes exponential
    rest = total - sum(big)
    sizes = big + [int(rnd.expovariate((files - 3) / rest)) for _ in range(files - 3)]
    blob = rnd.randbytes(max(sizes) + 1)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        for d in range(dirs):
            ti = tarfile.TarInfo(f"d{d}")
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        for i, n in enumerate(sizes):
            ti = tarfile.TarInfo(f"d{i * dirs // files}/f{i}")  # in directory order
            ti.size, ti.mode = n, 0o644
            t.addfile(ti, io.BytesIO(blob[:n]))
    os.rename(tmp, path)


# One measured apply, in a process of its own with TREE's driver on its path.
CHILD = """
import os, subprocess, sys, time
tree, layer, dest = sys.argv[1:4]
sys.path.insert(0, os.path.join(tree, "driver", "src"))
from cvmfs_graphdriver import archive, whiteouts
os.sync()
cat = subprocess.Popen(["cat", layer], stdout=subprocess.PIPE)
t0, c0 = time.perf_counter(), os.times()
archive.apply_tar(cat.stdout, dest, whiteouts.OverlayUpper())
while cat.stdout.read(1 << 20):
    pass
t1, c1 = time.perf_counter(), os.times()
cat.wait()
print(t1 - t0, c1.user - c0.user, c1.system - c0.system)
"""


def apply_once(tree: str, layer: str, work: str) -> Tuple[float, float, float]:
    dest = os.path.join(work, "dest")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    out = subprocess.run([sys.executable, "-c", CHILD, tree, layer, dest],
                         capture_output=True, text=True, check=True).stdout.split()
    wall, user, system = (float(x) for x in out)
    return wall, user, system


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("tree_a")
    ap.add_argument("tree_b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--work", default="/var/tmp/apply-ab")
    args = ap.parse_args()
    trees = [os.path.abspath(args.tree_a), os.path.abspath(args.tree_b)]
    os.makedirs(args.work, exist_ok=True)
    print(f"A = {trees[0]}\nB = {trees[1]}\n{args.rounds} alternated rounds per layer, "
          f"{time.strftime('%Y-%m-%dT%H:%M:%S')}, load {os.getloadavg()[0]:.2f}")
    for name, (files, total, dirs) in LAYERS.items():
        layer = os.path.join(args.work, f"{name}.tar")
        if not os.path.exists(layer):
            make_layer(layer, files, total, dirs)
        runs: Dict[str, List[Tuple[float, float, float]]] = {t: [] for t in trees}
        for t in trees:
            apply_once(t, layer, args.work)  # warm-up, not counted
        for i in range(args.rounds):
            for t in trees if i % 2 == 0 else trees[::-1]:
                runs[t].append(apply_once(t, layer, args.work))
        print(f"\n{name}:")
        for label, t in zip("AB", trees):
            wall, user, system = (statistics.median(r[k] for r in runs[t]) for k in range(3))
            lo, hi = min(r[0] for r in runs[t]), max(r[0] for r in runs[t])
            print(f"  {label}: wall {wall:.2f} s (min {lo:.2f}, max {hi:.2f}), "
                  f"user {user:.2f} s, system {system:.2f} s")
        ratios = [b[0] / a[0] for a, b in zip(runs[trees[0]], runs[trees[1]])]
        print(f"  B / A: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}); B faster in {sum(r < 1 for r in ratios)} of "
              f"{len(ratios)} rounds")
    shutil.rmtree(os.path.join(args.work, "dest"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
