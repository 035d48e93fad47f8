"""Small file helpers shared by the driver and its thin-layer bookkeeping: durable writes,
and reads of files from trees others control."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

# How a file from a tree the daemon does not control (a CVMFS repository, a layer's diff)
# is opened: as what it must be, a regular file. Opening a FIFO blocks until a writer
# comes (the daemon's thread hangs), opening a device can act on it, a symlink can lead
# anywhere; O_NONBLOCK makes a FIFO's open return at once, O_NOFOLLOW refuses a symlink.
UNTRUSTED_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotReadable(Exception):
    """A file read_regular would not read; the message says why (it follows the name)."""


def read_regular(path: str, limit: int) -> bytes:
    """The content of `path`, which must be a regular file of at most `limit` bytes.
    Anything else is never opened as a file: checked with lstat first (a device is not
    opened at all), opened UNTRUSTED_READ_FLAGS, and what was opened checked again with
    fstat. Only the last component is not followed: the caller checks where the path
    leads. Raises FileNotFoundError when nothing is there, NotReadable otherwise."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise NotReadable(f"is not a regular file but {_kind(st.st_mode)}")
        fd = os.open(path, UNTRUSTED_READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NotReadable(f"cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # what was opened (the path may have changed since)
        if not stat.S_ISREG(st.st_mode):
            raise NotReadable(f"is not a regular file but {_kind(st.st_mode)}")
        if st.st_size > limit:
            raise NotReadable(f"is {st.st_size} bytes, more than the {limit} read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotReadable(f"is more than the {limit} bytes read")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"of type {stat.S_IFMT(mode):o}"


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def write_durably(path: str, content: str) -> None:
    """Write `path` and flush it to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, content: str, *, durable: bool = True) -> None:
    """Replace `path` with `content` so readers see the old or the new file, never half.
    Writers racing on the same path each use their own temporary file (the last rename
    wins). `durable`: the content is on disk before it replaces the file (what a crash
    of the process alone needs is the rename, which holds without)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            if durable:
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
