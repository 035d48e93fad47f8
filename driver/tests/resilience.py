"""The resilience tally (issue 11): what the hostile-input, fault and load tests tried
and what came of it, printed as one line at the end of the test run.

A test records through the `tally` fixture:

    tally.hostile(refused=True)          one hostile input: refused with a clear error
    tally.hostile(refused=False)         ... or accepted, nothing escaping (contained)
    tally.fault(survived=True)           one injected fault, recovered from
    tally.lost(nbytes)                   bytes of committed data found missing afterwards
    tally.leaks(n)                       mounts, descriptors, threads or staging dirs left

The line counts only what ran: a test that was skipped recorded nothing. Lost bytes and
leaks must be 0; the tests that measure them also assert it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass
class Tally:
    hostile_tried: int = 0
    hostile_refused: int = 0
    faults_injected: int = 0
    faults_survived: int = 0
    bytes_lost: int = 0
    leaks_found: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._recorded = False  # a check that found nothing (leaks(0)) still ran

    def hostile(self, refused: bool, n: int = 1) -> None:
        with self._lock:
            self._recorded = True
            self.hostile_tried += n
            self.hostile_refused += n if refused else 0

    def fault(self, survived: bool) -> None:
        with self._lock:
            self._recorded = True
            self.faults_injected += 1
            self.faults_survived += 1 if survived else 0

    def lost(self, nbytes: int) -> None:
        with self._lock:
            self._recorded = True
            self.bytes_lost += nbytes

    def leaks(self, n: int) -> None:
        with self._lock:
            self._recorded = True
            self.leaks_found += n

    def ran(self) -> bool:
        return self._recorded or any(getattr(self, f.name) for f in fields(self))

    def line(self) -> str:
        contained = self.hostile_tried - self.hostile_refused
        return (f"resilience: faults injected {self.faults_injected} / survived "
                f"{self.faults_survived}; hostile inputs tried {self.hostile_tried} / "
                f"refused {self.hostile_refused} (accepted and contained {contained}); "
                f"bytes lost {self.bytes_lost}; leaks found {self.leaks_found}")


TALLY = Tally()
