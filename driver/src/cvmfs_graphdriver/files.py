"""Small durable-write helpers shared by the driver and its thin-layer bookkeeping."""

from __future__ import annotations

import os


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
    """Replace `path` with `content` so readers see the old or the new file, never half."""
    tmp = f"{path}.tmp"
    write_durably(tmp, content)
    os.rename(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
