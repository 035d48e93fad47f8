#!/usr/bin/env python3
"""The small operations, many times over: `docker rm` and warm `docker run --rm`, paired.

    sudo .venv/bin/python bench/small_ops.py            # 30 pairs of each
    sudo .venv/bin/python bench/small_ops.py --pairs 60

compare.py takes one `docker rm` per round and a warm start as the median of a few; a
figure of 20-300 ms then moves with the machine more than with the driver. This script
starts the same daemons as compare.py (its quick workloads), then, N times, takes each
operation on one driver and at once on the other (which goes first alternates), and
prints each operation's medians, the ratio of the medians and the median and quartiles
of the N paired ratios:

  warm_bb      `docker run --rm --network none IMAGE true`, IMAGE a one-layer busybox
  warm_multi   the same with the quick multi-layer image
  rm           `docker rm` of an exited container that wrote 20 MB (after a `sync`)
  rm_empty     `docker rm` of a created, never started container (two Removes, no data)

Not part of the test run. Needs what compare.py needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare  # noqa: E402 (this directory: the suite's daemons and workloads)

Figures = Dict[str, Dict[str, List[float]]]


def timed(figures: Figures, op: str, which: str, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    fn()
    figures.setdefault(op, {}).setdefault(which, []).append(time.perf_counter() - t0)


def pair(s: compare.Suite, i: int, figures: Figures) -> None:
    order = compare.DRIVERS if i % 2 == 0 else compare.DRIVERS[::-1]
    run = ["run", "--rm", "--network", "none"]
    for image, op in (("bb:bench", "warm_bb"), ("multi:bench", "warm_multi")):
        for which in order:
            d = s.daemons[which]
            timed(figures, op, which, lambda d=d, image=image: d.docker(*run, image, "true"))
    for which in order:
        s.daemons[which].docker("run", "--name", f"w{i}", "--network", "none", "bb:bench",
                                "sh", "-c", "dd if=/dev/zero of=/new bs=1M count=20 2>/dev/null")
        s.daemons[which].docker("create", "--name", f"e{i}", "--network", "none", "bb:bench",
                                "true")
    os.sync()
    for name, op in ((f"w{i}", "rm"), (f"e{i}", "rm_empty")):
        for which in order:
            d = s.daemons[which]
            timed(figures, op, which, lambda d=d, name=name: d.docker("rm", name))


def report(figures: Figures) -> None:
    for op, by in figures.items():
        a, b = by["cvmfs"], by["overlay2"]
        paired = sorted(x / y for x, y in zip(a, b))
        q = len(paired) // 4
        print(f"{op:11s} overlay2 {statistics.median(b) * 1e3:7.1f} ms  "
              f"cvmfs {statistics.median(a) * 1e3:7.1f} ms  "
              f"ratio {statistics.median(a) / statistics.median(b):.3f}  "
              f"paired {statistics.median(paired):.3f} "
              f"(quartiles {paired[q]:.3f}-{paired[-q - 1]:.3f}, n={len(paired)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/small_ops.py needs root (dockerd, mounts)")
    os.environ["DOCKER_BUILDKIT"] = "0"
    figures: Figures = {}
    with contextlib.ExitStack() as stack:
        w = compare.build_workloads(compare.QUICK)
        work = stack.enter_context(compare.workdir())
        s = compare.start_suite(compare.QUICK, w, work, stack)
        for which in compare.DRIVERS:
            s.daemons[which].docker("load", "-i", w.multi_tar, timeout=900)
        for i in range(args.pairs):
            pair(s, i, figures)
    report(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
