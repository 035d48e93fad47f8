"""Trees reached only through directory descriptors, never through a symlink.

Every walk below a layer directory goes one component at a time from a descriptor of
the directory above, with O_NOFOLLOW: a name swapped for a symlink (by a hostile tar
or by a process in a running container) fails instead of leading out of the tree.
Walks are iterative: any depth the kernel allows is fine.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, List, Optional, Sequence, Tuple

from .errors import UnsafeLayerError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_dir_at(dir_fd: int, name: str, shown: str) -> int:
    """Open directory `name` in `dir_fd`; UnsafeLayerError if it is a symlink or not a
    directory (`shown` names it in the error)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeLayerError(
                f"{shown!r} is a symlink or not a directory; refusing to go through it"
            ) from None
        raise


def lstat_at(dir_fd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def proc_path(dir_fd: int, name: Optional[str] = None) -> str:
    """A path for calls that only take paths: the pinned directory, or one name in it
    (the last component is not followed by l* calls)."""
    return f"/proc/self/fd/{dir_fd}" if name is None else f"/proc/self/fd/{dir_fd}/{name}"


def open_dirs(root_fd: int, parts: Sequence[str], *, create: bool,
              refuse: Callable[[str], str]) -> int:
    """Open the directory `parts` below `root_fd` one component at a time. Missing
    directories are made (0755, whatever the umask) when `create`; `refuse(where)` words
    the error for a component that is a symlink or not a directory. The caller closes
    the returned fd."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            where = "/".join(parts[: i + 1])
            try:
                nfd = open_dir_at(fd, part, where)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = open_dir_at(fd, part, where)
                os.chmod(nfd, 0o755)  # as moby's untar makes missing parents, any umask
            except UnsafeLayerError:
                raise UnsafeLayerError(refuse(where)) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_at(dir_fd: int, name: str) -> None:
    """Remove `name` in `dir_fd`, a whole tree if a directory, without following
    symlinks and without recursion."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # Depth-first: each frame is (fd of a directory, the fd of its parent, its name).
    stack: List[Tuple[int, int, str]] = [(os.open(name, DIR_FLAGS, dir_fd=dir_fd), dir_fd, name)]
    try:
        while stack:
            fd, _, _ = stack[-1]
            descended = False
            for child in os.listdir(fd):
                cst = lstat_at(fd, child)
                if cst is None:
                    continue
                if stat.S_ISDIR(cst.st_mode):
                    stack.append((os.open(child, DIR_FLAGS, dir_fd=fd), fd, child))
                    descended = True
                    break
                os.unlink(child, dir_fd=fd)
            if descended:
                continue
            fd, parent_fd, own = stack.pop()
            os.close(fd)
            os.rmdir(own, dir_fd=parent_fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def remove_tree(path: str) -> None:
    """Remove the directory tree at `path` (the path itself must not be a symlink)."""
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, DIR_FLAGS)
    try:
        remove_at(fd, name)
    finally:
        os.close(fd)
