"""Helpers of the fault tests (issue 11): what injects a fault and what checks that
nothing was lost or leaked afterwards. The driver tests' own helpers (layer_tools) are
imported, not copied."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import subprocess
import tarfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from harness import settle  # noqa: F401 (the fault tests' helpers, in one place)
from layer_tools import mounts_below

from cvmfs_graphdriver import mounts

HANG_SECONDS = 30  # "did not hang": every call here answers in a second or two
_BLOCK = hashlib.sha256(b"fault").digest() * (1 << 15)  # 1 MiB, not zeros (no holes)


def detach_below(path: str) -> None:
    """Lazily unmount everything mounted below `path`, deepest first."""
    for point in sorted(mounts_below(path), key=len, reverse=True):
        mounts.unmount(point)


# ---------------------------------------------------------------------------- FUSE


class FuseMount:
    """A FUSE mount at `target` with no file system server behind it, as the kernel
    sees a repository that misbehaves:

    - "eacces": mounted for uid 1000 without allow_other, so root (the daemon) gets
      EACCES for everything under it - a real permission denied that root cannot bypass;
    - "hang": the kernel's INIT is never answered, so every lookup under it blocks (a
      CVMFS or NFS mount that stopped answering) until close() aborts the connection
      (ENOTCONN from then on).
    """

    def __init__(self, target: str, kind: str) -> None:
        assert kind in ("eacces", "hang")
        self.target = target
        uid = 1000 if kind == "eacces" else 0
        self.fd: Optional[int] = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self.fd},rootmode=40000,user_id={uid},group_id={uid}"
        subprocess.run(["mount", "-n", "-i", "-t", "fuse.fault", "-o", opts, "fault", target],
                       pass_fds=(self.fd,), check=True, capture_output=True)

    def release(self) -> None:
        """Abort the connection: whatever is blocked under it returns (ENOTCONN)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.release()
        subprocess.run(["umount", "-l", self.target], check=False, capture_output=True)


# ---------------------------------------------------------------------------- timing


def did_not_hang(action: Callable[[], Any], seconds: float = HANG_SECONDS,
                 release: Optional[Callable[[], None]] = None) -> Tuple[Any, float]:
    """Run `action` in a thread; fail if it has not returned within `seconds` (after
    `release`, which lets a blocked action return). Returns (result or the exception
    it raised, seconds it took)."""
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = action()
        except BaseException as e:
            out["value"] = e

    start = time.monotonic()
    t = threading.Thread(target=run, daemon=True, name="fault-action")
    t.start()
    t.join(seconds)
    took = time.monotonic() - start
    if t.is_alive():
        if release is not None:
            release()
        t.join(10)
        raise AssertionError(f"hung: still blocked after {seconds} s")
    return out["value"], took


# ---------------------------------------------------------------------------- space


def free_blocks(path: str) -> int:
    """Free blocks once the file system has settled: xfs frees the blocks of deleted
    inodes in the background (inodegc), so it is synced and read until two readings
    0.2 s apart agree (at most 10 s)."""
    last = -1
    for _ in range(50):
        os.sync()
        now = os.statvfs(path).f_bfree
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return last


def fill(directory: str, chunk: int = 1 << 20) -> int:
    """Write 1 MiB files into `directory` until the file system is full (ENOSPC, which
    must come); returns the bytes written."""
    written = 0
    for i in range(1 << 20):
        try:
            with open(os.path.join(directory, f"fill-{i}"), "wb") as f:
                f.write(_BLOCK[:chunk])
                f.flush()
                os.fsync(f.fileno())
            written += chunk
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT), e
            return written
    raise AssertionError("the file system never filled up")


def fill_up(directory: str) -> None:
    """Also the last blocks (what 1 MiB files leave): directories until not even one
    more fits (small files near full are slow: ext4 retries each allocation)."""
    for i in range(1 << 16):
        try:
            os.mkdir(os.path.join(directory, f"dir-{i}"))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return
    raise AssertionError("directories never filled the file system")


class BigTar(io.RawIOBase):
    """A layer tar of `files` ({name: size}), generated as it is read (no copy in
    memory): contents are non-zero bytes."""

    def __init__(self, files: Dict[str, int]) -> None:
        self._parts = self._gen(files)
        self._buf = b""

    @staticmethod
    def _gen(files: Dict[str, int]) -> Iterator[bytes]:
        for name, size in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_600_000_000
            yield ti.tobuf(tarfile.PAX_FORMAT)
            left = size
            while left:
                n = min(left, len(_BLOCK))
                yield _BLOCK[:n]
                left -= n
            if size % 512:
                yield bytes(512 - size % 512)
        yield bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._parts)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# ---------------------------------------------------------------------------- lost, leaked


def contents(root: str) -> Dict[str, Tuple[str, int]]:
    """relative path -> (sha256, size) of every regular file below `root`."""
    out: Dict[str, Tuple[str, int]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full) or os.path.islink(full):
                continue
            with open(full, "rb") as f:
                data = f.read()
            out[os.path.relpath(full, root)] = (hashlib.sha256(data).hexdigest(), len(data))
    return out


def bytes_lost(before: Dict[str, Tuple[str, int]], root: str) -> int:
    """Bytes of the files in `before` that are now missing or changed below `root`."""
    try:
        now = contents(root)
    except OSError:
        now = {}
    return sum(size for path, (digest, size) in before.items()
               if now.get(path, ("", 0))[0] != digest)


def fds() -> List[str]:
    """What this process's descriptors point to (a leak shows up as one more)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(out)


def threads() -> List[str]:
    return sorted(t.name for t in threading.enumerate())


