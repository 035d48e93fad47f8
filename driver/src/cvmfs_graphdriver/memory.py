"""How the daemons use the C library's malloc (glibc): few arenas, and what a call that
moved a layer's worth of data freed is given back to the system."""

from __future__ import annotations

import ctypes
import os
from typing import Any, Optional

# glibc gives threads that allocate at the same time arenas of their own, up to eight per
# core, and gives back little of what is freed in them. A daemon with a thread per plugin
# connection (and gRPC's pool) then grew round after round of bench/compare.py: 61 MB peak
# over ten rounds, its RSS after each round wandering from 29 to 47 MB. Python allocates
# under the GIL, so threads gain nothing from arenas of their own; two are kept.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)

# A call whose body and answer moved at least this much (an ApplyDiff or Diff of a layer,
# a Changes of many files) leaves its freed buffers (1 MiB reads, a tar's headers) in the
# heap, where glibc keeps them: RSS after a round of bench/compare.py wandered by 4-6 MB.
# malloc_trim after such a call gives them back (0.2-0.7 ms; in-process, 4 ApplyDiffs of
# 160 MB at once, six times: RSS 30.1-33.2 MB without, 28.5-29.8 MB with). Smaller calls
# move too little to be worth a trim.
RELEASE_AFTER_BYTES = 8 << 20


def _libc() -> Optional[Any]:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap the C library's malloc arenas, before the daemon starts threads. False when
    MALLOC_ARENA_MAX is set (the operator's value stands) or the C library has no such
    setting (not glibc)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arenas) == 1)


_malloc_trim = getattr(_libc(), "malloc_trim", None)
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]


def release_free_memory() -> bool:
    """Give the heap's free memory back to the system (glibc's malloc_trim); False where
    the C library has no such call."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
