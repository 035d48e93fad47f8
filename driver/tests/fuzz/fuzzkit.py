"""Helpers of the fuzzers: their example budgets, descriptor and thread counts."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

# How many times its CI share of examples a fuzzer runs under each profile.
_SCALE = {"ci": 1, "dev": 1, "deep": 50}


def examples(ci: int) -> int:
    """A fuzzer's max_examples: `ci` (its share of the ~120 s CI budget), scaled for the
    profile in use."""
    return ci * _SCALE.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), 1)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds


def settle(count: Callable[[], int], want: int, seconds: float = 3.0) -> int:
    """`count()` once it is back to `want` (threads of a server wind down after the
    answer), or whatever it is after `seconds`."""
    deadline = time.monotonic() + seconds
    now = count()
    while now > want and time.monotonic() < deadline:
        time.sleep(0.005)
        now = count()
    return now


def threads() -> int:
    return threading.active_count()
