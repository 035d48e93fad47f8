"""Small durable-write helpers shared by the driver and its thin-layer bookkeeping."""

from __future__ import annotations

import contextlib
import os
import tempfile


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def write_durably(path: str, content: str) -> None:
    """Write `path` and flush it to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, content: str) -> None:
    """Replace `path` with `content` so readers see the old or the new file, never half.
    Writers racing on the same path each use their own temporary file (the last rename
    wins)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
