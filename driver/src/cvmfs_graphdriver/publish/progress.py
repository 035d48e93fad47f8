"""Progress of a long conversion: layers, bytes, rate.

On a terminal, one live line on stderr, rewritten in place a few times a second; in a
log (stderr not a terminal: a pipe, a file, journald, Ansible), a plain line every
LOG_INTERVAL seconds instead, so logs stay readable and grep-able.
"""

from __future__ import annotations

import io
import sys
import time
from typing import IO, Any, Callable, Optional

LIVE_INTERVAL = 0.2  # seconds between redraws of the live line
LOG_INTERVAL = 10.0  # seconds between plain progress lines in a log
PREFIX = "cvmfs-thin: "


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


_active: Optional[Meter] = None


def clear_active() -> None:
    """Before a plain progress line: the live line of the meter running, if any, goes."""
    if _active is not None:
        _active.clear()


class Meter:
    """Counts the bytes of `total_layers` layers (`total_bytes` in all) going into a store."""

    def __init__(self, what: str, total_layers: int, total_bytes: int,
                 stream: Optional[IO[str]] = None, live: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic,
                 log_interval: float = LOG_INTERVAL) -> None:
        self.what = what
        self.total_layers = total_layers
        self.total_bytes = total_bytes
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self.clock = clock
        self.log_interval = log_interval
        self.layer = 0  # layers finished
        self.done = 0  # bytes
        self.phase = ""
        self.started = clock()
        self._last = self.started
        self._drawn = False
        global _active
        _active = self

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = self.done / elapsed
        current = min(self.layer + 1, self.total_layers)
        return (f"{self.what}: layer {current}/{self.total_layers}"
                f"{' ' + self.phase if self.phase else ''}, "
                f"{mb(self.done)} of {mb(self.total_bytes)}, {mb(rate)}/s")

    def start_layer(self, phase: str) -> None:
        self.phase = phase
        self._tick(force=self.live)

    def add(self, n: int) -> None:
        self.done += n
        self._tick()

    def layer_done(self) -> None:
        self.layer += 1
        self._tick(force=self.live)

    def _tick(self, force: bool = False) -> None:
        now = self.clock()
        if self.live:
            if force or now - self._last >= LIVE_INTERVAL:
                self.stream.write(f"\r\x1b[K{PREFIX}{self.line()}")
                self.stream.flush()
                self._drawn = True
                self._last = now
        elif now - self._last >= self.log_interval:
            self.stream.write(f"{PREFIX}{self.line()}\n")
            self.stream.flush()
            self._last = now

    def clear(self) -> None:
        """Before another line is printed: the live line goes away (it is redrawn later)."""
        if self.live and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def finish(self) -> None:
        global _active
        elapsed = max(self.clock() - self.started, 1e-6)
        self.clear()
        if _active is self:
            _active = None
        if self.total_layers:
            self.stream.write(f"{PREFIX}{self.what}: {self.layer}/{self.total_layers} layers, "
                              f"{mb(self.done)} in {elapsed:.1f} s "
                              f"({mb(self.done / elapsed)}/s)\n")
            self.stream.flush()

    def reader(self, raw: IO[bytes]) -> IO[bytes]:
        """`raw`, counting what is read from it."""
        return _Counting(raw, self)  # type: ignore[return-value]


class _Counting(io.RawIOBase):
    def __init__(self, raw: IO[bytes], meter: Meter) -> None:
        self.raw = raw
        self.meter = meter

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        b[: len(data)] = data
        self.meter.add(len(data))
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.meter.add(len(data))
        return data
