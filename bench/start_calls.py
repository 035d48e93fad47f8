#!/usr/bin/env python3
"""The driver's own work in a warm `docker run --rm IMAGE true`, in-process.

    sudo .venv/bin/python bench/start_calls.py                 # 200 starts
    sudo PYTHONPATH=OTHER/driver/src .venv/bin/python bench/start_calls.py   # another tree

A warm start makes these calls of the driver, in this order: CreateReadWrite of the init
layer on the image's top layer, Get and Put of it, CreateReadWrite of the container's
layer on it, Get (the start) and Put (the exit), then Remove of both. This script makes
them N times on a Driver (no dockerd, no plugin socket) with its home and state file on
/var/tmp (the disk dockerd's data root is on, not a tmpfs), and prints each call's median
and their sum. Run it for two trees in turn to compare them: the machine moves by more
than the difference between two runs of one tree.

Not part of the test run. Needs root (overlay mounts).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from typing import Callable, Dict, List

from cvmfs_graphdriver.config import Config
from cvmfs_graphdriver.driver import Driver
from cvmfs_graphdriver.layout import LayerId


def image_tar() -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        entry = tarfile.TarInfo("bin")
        entry.type = tarfile.DIRTYPE
        t.addfile(entry)
    buf.seek(0)
    return buf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/start_calls.py needs root (overlay mounts)")
    work = tempfile.mkdtemp(prefix="cgd-start-calls-", dir="/var/tmp")
    try:
        d = Driver(Config(), state_file=os.path.join(work, "state.json"))
        d.init(os.path.join(work, "home"), None, None, None)
        image = LayerId("a" * 64)
        d.create(image, None, "", None, read_write=False)
        d.apply_diff(image, None, image_tar())
        times: Dict[str, List[float]] = {}

        def timed(name: str, call: Callable[..., object], *a: object, **k: object) -> None:
            t0 = time.perf_counter()
            call(*a, **k)
            times.setdefault(name, []).append(time.perf_counter() - t0)

        for i in range(args.starts):
            container = LayerId(f"{i + 1:064x}")
            init = LayerId(f"{container}-init")
            timed("CreateReadWrite init", d.create, init, image, "", None, read_write=True)
            timed("Get init", d.get, init)
            timed("Put init", d.put, init)
            timed("CreateReadWrite", d.create, container, init, "", None, read_write=True)
            timed("Get", d.get, container)
            timed("Put", d.put, container)
            timed("Remove", d.remove, container)
            timed("Remove init", d.remove, init)
        d.wait_for_removals()
        d.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = 0.0
    for name, values in times.items():
        median = statistics.median(values) * 1e3
        total += median
        print(f"{name:22s} {median:6.3f} ms")
    print(f"{'sum of the medians':22s} {total:6.3f} ms  ({args.starts} starts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
