"""What changed between two trees: moby's ChangesDirs and ChangesSize (pkg/archive/
changes.go), which `docker diff`, the naive Diff and DiffSize are made of.

Both trees are read only through directory descriptors (fdtree.DirStack), one component
at a time with O_NOFOLLOW, so a running container that swaps a directory for a symlink
cannot lead the walk out of its layer; and iteratively, so any depth the kernel allows
is fine.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from . import fdtree, tarformat, whiteouts
from .errors import UnsafeLayerError

CHANGE_MODIFY, CHANGE_ADD, CHANGE_DELETE = 0, 1, 2


@dataclass(frozen=True)
class Change:
    path: str
    kind: int

    def to_json(self) -> dict:
        return {"Path": self.path, "Kind": self.kind}


def changes_dirs(new_dir: str, old_dir: Optional[str]) -> List[Change]:
    """Changes between two whole trees (moby's ChangesDirs; `old_dir` None = empty)."""
    return [change for change, _ in _changes(new_dir, old_dir)]


def changes_in_upper(upper_dir: str, new_dir: str, old_dir: str) -> List[Change]:
    """changes_dirs(new_dir, old_dir) for a `new_dir` that is an overlay mount of
    `upper_dir` over the layers `old_dir` shows, without redirects or metacopy (what
    native diff requires): a name the upper dir does not hold shows the same lower entry
    in both trees, so only the upper dir's names (and all of an opaque directory's) are
    compared - the same changes, read from a few entries instead of two whole trees."""
    return [change for change, _ in _compare(*_collect_upper(upper_dir, new_dir, old_dir))]


def changes_size(new_dir: str, old_dir: Optional[str]) -> int:
    """Bytes of the added and modified non-directories (moby's ChangesSize of
    ChangesDirs), hard links counted once."""
    seen = set()
    total = 0
    for change, st in _changes(new_dir, old_dir):
        if change.kind == CHANGE_DELETE or st is None or stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_size
    return total


# ---------------------------------------------------------------------------- reading


@dataclass
class _Node:
    st: Optional[os.stat_result]  # None: the root
    cap: Optional[bytes]  # security.capability, compared as moby does
    children: Dict[str, _Node]


def _is_dir(st: Optional[os.stat_result]) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)


def _entries(stack: Optional[fdtree.DirStack]) -> Dict[str, int]:
    if stack is None:
        return {}
    with os.scandir(stack.fd) as it:
        return {e.name: e.inode() for e in it}


def _node(stack: fdtree.DirStack, name: str) -> Optional[_Node]:
    st = fdtree.lstat_at(stack.fd, name)
    if st is None:
        return None
    cap = None if stat.S_ISLNK(st.st_mode) else fdtree.xattr_at(
        stack.fd, name, tarformat.CAPABILITY_XATTR)
    return _Node(st, cap, {})


@dataclass
class _Level:
    """A directory being read on both sides (a side is None where it is no directory)."""

    names: Iterator[str]
    old: Optional[_Node]
    new: Optional[_Node]
    old_entries: Dict[str, int]
    new_entries: Dict[str, int]
    same_dev: bool


def _open_dirs(*paths: str) -> List[int]:
    """Directory descriptors of `paths` (none left open if one fails)."""
    fds: List[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, fdtree.DIR_FLAGS))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _collect(old_dir: str, new_dir: str) -> Tuple[_Node, _Node]:
    """Both trees, pruning subtrees that are the same inode on the same device (what
    overlay shows unchanged from a lower layer)."""
    old_root, new_root = _Node(None, None, {}), _Node(None, None, {})
    ofd, nfd = _open_dirs(old_dir, new_dir)
    with fdtree.DirStack(ofd) as olds, fdtree.DirStack(nfd) as news:
        os.close(ofd)
        os.close(nfd)

        def level(o: Optional[_Node], n: Optional[_Node], same_dev: bool) -> _Level:
            oe, ne = _entries(olds if o else None), _entries(news if n else None)
            names = iter(sorted(set(oe) | set(ne), key=os.fsencode))
            return _Level(names, o, n, oe, ne, same_dev)

        levels = [level(old_root, new_root,
                        os.fstat(olds.fd).st_dev == os.fstat(news.fd).st_dev)]
        while levels:
            lv = levels[-1]
            name = next(lv.names, None)
            if name is None:
                levels.pop()
                if levels:
                    if lv.old is not None:
                        olds.pop()
                    if lv.new is not None:
                        news.pop()
                continue
            if (lv.same_dev and name in lv.old_entries and name in lv.new_entries
                    and lv.old_entries[name] == lv.new_entries[name]):
                continue
            o = _node(olds, name) if lv.old is not None else None
            n = _node(news, name) if lv.new is not None else None
            if lv.old is not None and o is not None:
                lv.old.children[name] = o
            if lv.new is not None and n is not None:
                lv.new.children[name] = n
            o = o if o is not None and _is_dir(o.st) and _enter(olds, name) else None
            n = n if n is not None and _is_dir(n.st) and _enter(news, name) else None
            if o is None and n is None:
                continue
            same = (o is not None and n is not None and o.st is not None and n.st is not None
                    and o.st.st_dev == n.st.st_dev)
            levels.append(level(o, n, same))
    return old_root, new_root


def _enter(stack: fdtree.DirStack, name: str) -> bool:
    """Go down into directory `name`; False if it stopped being one since its lstat."""
    try:
        stack.push(name)
    except (FileNotFoundError, UnsafeLayerError):
        return False
    return True


def _collect_upper(upper_dir: str, new_dir: str, old_dir: str) -> Tuple[_Node, _Node]:
    """Both trees as _collect reads them, but only the names changes_in_upper compares:
    those in the upper dir's directories, and an opaque one's names in the old tree."""
    old_root, new_root = _Node(None, None, {}), _Node(None, None, {})
    ufd, nfd, ofd = _open_dirs(upper_dir, new_dir, old_dir)
    with fdtree.DirStack(ufd) as ups, fdtree.DirStack(nfd) as news, \
            fdtree.DirStack(ofd) as olds:
        for fd in (ufd, nfd, ofd):
            os.close(fd)

        def level(o: Optional[_Node], n: _Node) -> Tuple[Iterator[str], Optional[_Node], _Node]:
            names = set(_entries(ups))
            if o is not None and whiteouts.is_opaque(ups.fd):
                names |= set(_entries(olds))
            return iter(sorted(names, key=os.fsencode)), o, n

        levels = [level(old_root, new_root)]
        while levels:
            names, old, new = levels[-1]
            name = next(names, None)
            if name is None:
                levels.pop()
                if levels:
                    ups.pop()
                    news.pop()
                    if old is not None:
                        olds.pop()
                continue
            n = _node(news, name)
            o = _node(olds, name) if old is not None else None
            if old is not None and o is not None:
                old.children[name] = o
            if n is None:
                continue  # deleted (a whiteout in the upper dir), or gone meanwhile
            new.children[name] = n
            ust = fdtree.lstat_at(ups.fd, name)
            if not (_is_dir(n.st) and _is_dir(ust) and _enter(ups, name)):
                continue
            if not _enter(news, name):
                ups.pop()
                continue
            o = o if o is not None and _is_dir(o.st) and _enter(olds, name) else None
            levels.append(level(o, n))
    return old_root, new_root


# ---------------------------------------------------------------------------- comparing


def _same_time(a: int, b: int) -> bool:
    # Tar has whole seconds: equal, or the same second with one side at .0 exactly.
    return a == b or (
        a // 1_000_000_000 == b // 1_000_000_000
        and (a % 1_000_000_000 == 0 or b % 1_000_000_000 == 0)
    )


def _stat_different(o: os.stat_result, n: os.stat_result) -> bool:
    if (o.st_mode, o.st_uid, o.st_gid, o.st_rdev) != (n.st_mode, n.st_uid, n.st_gid, n.st_rdev):
        return True
    # moby tests `mode & S_IFDIR != S_IFDIR`, so block devices (and sockets) share the
    # directories' exemption from the mtime/size comparison.
    if o.st_mode & stat.S_IFDIR != stat.S_IFDIR:
        return not _same_time(o.st_mtime_ns, n.st_mtime_ns) or o.st_size != n.st_size
    return False


@dataclass
class _Frame:
    path: str
    info: _Node
    added: bool
    at_entry: int  # where this directory's own change goes if its content changed
    old_children: Dict[str, _Node]
    names: Iterator[str]


def _changes(new_dir: str, old_dir: Optional[str]
             ) -> List[Tuple[Change, Optional[os.stat_result]]]:
    """moby's addChanges over the collected trees, iteratively: each change with the
    new tree's lstat of its entry (None for deletions)."""
    if old_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory() as empty:
            return _changes(new_dir, empty)
    return _compare(*_collect(old_dir, new_dir))


def _compare(old_root: _Node, new_root: _Node
             ) -> List[Tuple[Change, Optional[os.stat_result]]]:
    """moby's addChanges over two collected trees."""
    out: List[Tuple[Change, Optional[os.stat_result]]] = []

    def frame(path: str, info: _Node, old: Optional[_Node], added: bool) -> _Frame:
        at_entry = len(out)
        if old is None and path != "/":
            out.append((Change(path, CHANGE_ADD), info.st))
            added = True
        is_dir = info.st is None or stat.S_ISDIR(info.st.st_mode)
        old_children = dict(old.children) if old is not None and is_dir else {}
        return _Frame(path, info, added, at_entry, old_children,
                      iter(sorted(info.children, key=os.fsencode)))

    stack = [frame("/", new_root, old_root, False)]
    while stack:
        f = stack[-1]
        name = next(f.names, None)
        if name is not None:
            child = f.info.children[name]
            cpath = f"{f.path.rstrip('/')}/{name}"
            ochild = f.old_children.pop(name, None)
            child_added = False
            if ochild is not None:
                assert ochild.st is not None and child.st is not None
                if _stat_different(ochild.st, child.st) or ochild.cap != child.cap:
                    out.append((Change(cpath, CHANGE_MODIFY), child.st))
                    child_added = True
            stack.append(frame(cpath, child, ochild, child_added))
            continue
        stack.pop()
        for gone in sorted(f.old_children, key=os.fsencode):
            out.append((Change(f"{f.path.rstrip('/')}/{gone}", CHANGE_DELETE), None))
        is_dir = f.info.st is None or stat.S_ISDIR(f.info.st.st_mode)
        if len(out) > f.at_entry and is_dir and not f.added and f.path != "/":
            out.insert(f.at_entry, (Change(f.path, CHANGE_MODIFY), f.info.st))
    return out
