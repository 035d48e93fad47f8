"""What the benchmark scripts record of the machine they ran on (one reading, used by
compare.py and shaped_starts.py)."""

from __future__ import annotations

import os
import platform
from typing import Dict


def host_facts() -> Dict[str, str]:
    """CPU model and count, memory, kernel and the load average, as read now."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"cpu_model": cpu, "cpus": str(os.cpu_count()), "mem_gib": f"{mem:.1f}",
            "kernel": platform.release(), "load": load}
