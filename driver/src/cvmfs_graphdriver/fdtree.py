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
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

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


def xattr_at(dir_fd: int, name: str, key: str) -> Optional[bytes]:
    """Extended attribute `key` of entry `name` in `dir_fd` (not followed if a symlink),
    or None where it has none, the filesystem keeps none, or the entry is gone."""
    try:
        return os.getxattr(proc_path(dir_fd, name), key, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return None
        raise


def open_dirs(root_fd: int, parts: Sequence[str], *, create: bool,
              refuse: Callable[[str], str]) -> int:
    """Open the directory `parts` below `root_fd` one component at a time. Missing
    directories are made (0755, whatever the umask) when `create`; `refuse(where)` words
    the error for a component that is a symlink or not a directory. The caller closes
    the returned fd."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                try:
                    nfd = open_dir_at(fd, part, part)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = open_dir_at(fd, part, part)
                    os.chmod(nfd, 0o755)  # as moby's untar makes missing parents, any umask
            except UnsafeLayerError:
                raise UnsafeLayerError(refuse("/".join(parts[: i + 1]))) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


# Descriptors a DirStack keeps open: the deepest levels (where a walk spends its time)
# and the root. Any depth costs no more (a tree can be deeper than the open-file limit).
KEEP_OPEN = 64


class DirStack:
    """The directories from a root down to the current one, each opened from the one
    above by name with O_NOFOLLOW.

    Only the root and the KEEP_OPEN deepest levels hold descriptors. Going back up to a
    level whose descriptor was closed reopens it as ".." of the level below, which must
    be the very directory left (same device and inode): a tree rearranged meanwhile (a
    running container) is an UnsafeLayerError, never a walk somewhere else.
    """

    def __init__(self, root_fd: int) -> None:
        fd = os.dup(root_fd)
        st = os.fstat(fd)
        self._fds: List[Optional[int]] = [fd]
        self._ids: List[Tuple[int, int]] = [(st.st_dev, st.st_ino)]
        self._closed_upto = 0  # levels 1.._closed_upto hold no descriptor
        self.names: List[str] = []  # the components from the root to the current level

    @property
    def fd(self) -> int:
        fd = self._fds[-1]
        assert fd is not None
        return fd

    @property
    def depth(self) -> int:
        return len(self.names)

    def push(self, name: str, fd: Optional[int] = None) -> os.stat_result:
        """Go down into directory `name` of the current level (or adopt `fd`, already
        opened so); UnsafeLayerError if it is a symlink or no directory. Returns its
        fstat."""
        if fd is None:
            fd = open_dir_at(self.fd, name, "/".join([*self.names, name]))
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fds.append(fd)
        self._ids.append((st.st_dev, st.st_ino))
        self.names.append(name)
        if len(self._fds) - 1 - self._closed_upto > KEEP_OPEN:
            self._closed_upto += 1
            closing = self._fds[self._closed_upto]
            assert closing is not None
            os.close(closing)
            self._fds[self._closed_upto] = None
        return st

    def pop(self) -> None:
        """Go back up one level."""
        assert self.names, "already at the root"
        fd = self._fds.pop()
        self._ids.pop()
        self.names.pop()
        assert fd is not None
        try:
            if self._fds[-1] is None:
                up = os.open("..", DIR_FLAGS, dir_fd=fd)
                st = os.fstat(up)
                if (st.st_dev, st.st_ino) != self._ids[-1]:
                    os.close(up)
                    raise UnsafeLayerError(
                        f"{'/'.join(self.names)!r} was moved while being read; try again")
                self._fds[-1] = up
                self._closed_upto -= 1
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = []

    def __enter__(self) -> DirStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def go_to(stack: DirStack, parts: Sequence[str], *, create: bool,
          refuse: Callable[[str], str]) -> None:
    """Move `stack` to the directory `parts` below its root, through the deepest level
    the two paths share: a walk of names in tree order costs one step per name, at any
    depth. Missing directories are made (0755, whatever the umask) when `create`, else
    FileNotFoundError; a component that is a symlink or no directory is an
    UnsafeLayerError worded by `refuse(where)`."""
    common = 0
    limit = min(len(parts), stack.depth)
    while common < limit and stack.names[common] == parts[common]:
        common += 1
    while stack.depth > common:
        stack.pop()
    for part in parts[common:]:
        try:
            try:
                stack.push(part)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=stack.fd)
                stack.push(part)
                os.chmod(stack.fd, 0o755)  # as moby's untar makes missing parents
        except UnsafeLayerError:
            raise UnsafeLayerError(refuse("/".join([*stack.names, part]))) from None


def sorted_names(dir_fd: int) -> List[str]:
    """The names in a directory in byte order, as Go's Walk visits them."""
    return sorted(os.listdir(dir_fd), key=os.fsencode)


def walk(root_fd: int, descend: Optional[Callable[[os.stat_result], bool]] = None,
         ) -> Iterator[Tuple[DirStack, str, os.stat_result]]:
    """Every entry below `root_fd`, depth first in byte order of names, parents before
    their children: (the stack, whose `fd` is the entry's directory and `names` its
    path; the entry's name; its lstat). An entry that vanishes or stops being a
    directory meanwhile is passed over; a directory whose lstat `descend` refuses is
    yielded, its contents are not (to stay on one filesystem, say)."""
    with DirStack(root_fd) as stack:
        pending: List[Iterator[str]] = [iter(sorted_names(stack.fd))]
        while pending:
            name = next(pending[-1], None)
            if name is None:
                pending.pop()
                if pending:
                    stack.pop()
                continue
            st = lstat_at(stack.fd, name)
            if st is None:
                continue
            yield stack, name, st
            if not stat.S_ISDIR(st.st_mode) or (descend is not None and not descend(st)):
                continue
            try:
                stack.push(name)
            except (FileNotFoundError, UnsafeLayerError):
                continue  # changed since its lstat
            pending.append(iter(sorted_names(stack.fd)))


def directory_size(root: str) -> int:
    """Bytes of all non-directories below `root`, hard links counted once (moby's
    directory.Size)."""
    seen = set()
    total = 0
    fd = os.open(root, DIR_FLAGS)
    try:
        for _, _, st in walk(fd):
            if stat.S_ISDIR(st.st_mode) or st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += st.st_size
    finally:
        os.close(fd)
    return total


def remove_at(dir_fd: int, name: str) -> None:
    """Remove `name` in `dir_fd`, a whole tree if a directory, without following
    symlinks, at any depth."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    with DirStack(dir_fd) as stack:
        stack.push(name)
        pending: List[Iterator[os.DirEntry]] = [iter(list(os.scandir(stack.fd)))]
        while True:
            child = next(pending[-1], None)
            if child is not None:
                # The kind from the directory entry (no lstat); pushing checks it again.
                if not child.is_dir(follow_symlinks=False):
                    try:
                        os.unlink(child.name, dir_fd=stack.fd)
                        continue
                    except FileNotFoundError:
                        continue
                    except IsADirectoryError:
                        pass  # made a directory since it was listed
                try:
                    stack.push(child.name)
                except FileNotFoundError:
                    continue
                pending.append(iter(list(os.scandir(stack.fd))))
                continue
            pending.pop()
            own = stack.names[-1]
            stack.pop()
            os.rmdir(own, dir_fd=stack.fd)
            if not pending:
                return


def remove_tree(path: str) -> None:
    """Remove the directory tree at `path` (the path itself must not be a symlink)."""
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, DIR_FLAGS)
    try:
        remove_at(fd, name)
    finally:
        os.close(fd)
