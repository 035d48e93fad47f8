"""The snapshotter: containerd 1.6's overlayfs snapshotter (snapshots/overlay/overlay.go),
in Python, over the SQLite metastore.

Every operation has containerd's semantics and error classes: keys and committed names
share one namespace; parents must be committed; `Commit` renames an active snapshot to
a name (labels replaced, usage recorded); `Remove` refuses a snapshot with children and
deletes its directory (and any other orphaned one) right away; `Usage` walks the upper
dir of an active snapshot and returns the recorded figure otherwise; `Cleanup` deletes
directories no snapshot owns.

Crash safety. A new snapshot's directory is built in `staging/`, then, inside the
metadata transaction that records it, renamed to `snapshots/<id>` and the parent
directory flushed; the transaction commits last. Killed at any point, the daemon
restarts with the snapshot fully there (metadata and directory) or absent (at most a
directory without metadata, which `Cleanup` and the next `Remove` delete; a later
snapshot given the same id by a rolled-back sequence replaces it). Removal is the
reverse: metadata first, then the directory is renamed into `staging/` and deleted; on a
full disk, where the metadata cannot be written, the directory goes first, renamed into
`staging/` as a tombstone that start-up and `Cleanup` complete (see `remove`).
`staging/` is emptied at start. The daemon never mounts or unmounts snapshots, so
restarting it does not disturb running containers.

Remote snapshots: a committed snapshot recorded with a `remote` object (see
`commit_remote`) has no `fs/` of its own; the resolver registered for its "type"
returns its lower directories when a child is mounted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from .. import fdtree
from .. import mounts as host_mounts
from ..files import fsync_dir
from .errdefs import FailedPrecondition, InvalidArgument, ResourceExhausted, SnapshotterError
from .layout import SnapshotterLayout
from .metastore import (
    KIND_ACTIVE,
    KIND_VIEW,
    Info,
    Lower,
    MetaStore,
    Snapshot,
    StoreError,
    StoreFull,
    Transaction,
    Usage,
)
from .mountspec import Mount, MountOptions, needs_userxattr, snapshot_mounts, supports_index

log = logging.getLogger(__name__)

# Lower directories (top first) of a remote committed snapshot.
# (layout, the remote snapshot, whether it has a parent) -> its lower dirs, top first.
RemoteResolver = Callable[[SnapshotterLayout, Lower, bool], List[str]]
# Called with (snapshotter, key, parent, labels) before a Prepare creates anything: may
# record a remote snapshot (commit_remote) and raise AlreadyExists (lazy pulls).
PrepareHook = Callable[["OverlaySnapshotter", str, str, Mapping[str, str]], None]
# Called with the fs/ directory of an active snapshot about to be committed: a remote
# record to commit it as (a thin image's layer), or None. Its errors refuse the commit.
CommitHook = Callable[[str], Optional[Dict[str, Any]]]

BLOCK_UNIT = 512  # st_blocks unit
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# staging/del-<id>-<random>: the directory of snapshot <id>, whose removal is decided but
# whose row may still be in the metadata (see OverlaySnapshotter.remove).
TOMBSTONE_PREFIX = "del-"


def disk_usage(root: str) -> Usage:
    """containerd's fs.DiskUsage: every inode under `root` (itself included, hard links
    once) and its allocated blocks, without following symlinks, at any depth."""
    fd = os.open(root, fdtree.DIR_FLAGS)
    try:
        st = os.fstat(fd)
        seen = {(st.st_dev, st.st_ino)}
        size = st.st_blocks * BLOCK_UNIT
        for _, _, st in fdtree.walk(fd):
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                size += st.st_blocks * BLOCK_UNIT
    finally:
        os.close(fd)
    return Usage(size=size, inodes=len(seen))


def _remove_tree(path: str) -> None:
    try:
        fdtree.remove_tree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("failed to remove %s: %s", path, e)


class OverlaySnapshotter:
    """containerd's overlayfs snapshotter over `home` (see layout.py)."""

    def __init__(self, home: str, *, sync_commits: bool = True,
                 index_off: Optional[bool] = None, userxattr: Optional[bool] = None) -> None:
        self.layout = SnapshotterLayout(os.path.abspath(home))
        self.sync_commits = sync_commits
        self._resolvers: Dict[str, RemoteResolver] = {}
        self._prepare_hooks: List[PrepareHook] = []
        self._commit_hooks: List[CommitHook] = []
        self._closed = False
        self._removing = threading.Lock()  # serialises directory deletions (not metadata)
        home = self.layout.home
        os.makedirs(home, mode=0o700, exist_ok=True)
        # One daemon per home (containerd's bolt file is locked the same way): a second
        # one would sweep the first one's staging/ and race on every directory.
        self._lock_fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SnapshotterError(
                f"another snapshotter is using {home}; stop it first, or use another --home"
            ) from None
        try:
            self._open(home, index_off, userxattr)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(self, home: str, index_off: Optional[bool], userxattr: Optional[bool]) -> None:
        for d in (self.layout.snapshots, self.layout.staging):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
        if host_mounts.fs_magic(home) == host_mounts.OVERLAY_MAGIC:
            raise SnapshotterError(
                f"{home} is on overlayfs, which cannot hold overlay upper directories: "
                "choose a home on a regular filesystem (--home)")
        if not host_mounts.supports_d_type(home):
            raise SnapshotterError(
                f"{home} does not support d_type. If the backing filesystem is xfs, please "
                "reformat with ftype=1 to enable d_type support")
        self.ms = MetaStore(self.layout.metadata_db)
        self.options = MountOptions(
            index_off=supports_index() if index_off is None else index_off,
            userxattr=needs_userxattr(home) if userxattr is None else userxattr)
        if self._tombstones():  # removals that freed their directory, then were cut off
            with self._writing("failed to finish the removals a restart interrupted") as tx:
                self._finish_removals(tx)
        for leftover in os.listdir(self.layout.staging):  # nothing in staging/ is in use
            _remove_tree(os.path.join(self.layout.staging, leftover))

    # ------------------------------------------------------------------ remote hook

    def register_remote(self, kind: str, resolver: RemoteResolver) -> None:
        """Mount remote committed snapshots whose record has "type": `kind` with the
        directories `resolver` returns (top first)."""
        self._resolvers[kind] = resolver

    def add_prepare_hook(self, hook: PrepareHook) -> None:
        self._prepare_hooks.append(hook)

    def add_commit_hook(self, hook: CommitHook) -> None:
        self._commit_hooks.append(hook)

    def _remote_of(self, sid: str) -> Optional[Dict[str, Any]]:
        for hook in self._commit_hooks:
            record = hook(self.layout.fs(sid))
            if record is not None:
                return record
        return None

    def commit_remote(self, name: str, parent: str, remote: Mapping[str, Any],
                      labels: Optional[Mapping[str, str]] = None,
                      usage: Optional[Usage] = None,
                      populate: Optional[Callable[[str], None]] = None) -> str:
        """Record a committed snapshot `name` on `parent` whose files live elsewhere.

        `snapshots/<id>/` is created for it (empty, for masks and the like); `populate`,
        if given, fills the staging copy of that directory before it is renamed into place,
        inside the transaction. Returns the id. Errors as Prepare's (AlreadyExists when
        `name` exists, NotFound / InvalidArgument for the parent)."""
        with self._writing(f"failed to commit snapshot {name}") as tx:
            td = tempfile.mkdtemp(prefix="new-", dir=self.layout.staging)
            try:
                sid = tx.create_committed(name, parent, remote, usage or Usage(), labels)
                if populate is not None:
                    populate(td)
                self._put_in_place(td, sid)
            except BaseException:
                _remove_tree(td)
                raise
        return sid

    # ------------------------------------------------------------------ API

    def stat(self, key: str) -> Info:
        with self.ms.transaction() as tx:
            return tx.get_info(key)[1]

    def update(self, name: str, labels: Optional[Mapping[str, str]],
               fieldpaths: Sequence[str] = ()) -> Info:
        with self._writing(f"failed to update snapshot {name}") as tx:
            return tx.update_info(name, labels, fieldpaths)

    def usage(self, key: str) -> Usage:
        with self.ms.transaction() as tx:
            sid, info, usage = tx.get_info(key)
        if info.kind == KIND_ACTIVE:
            return disk_usage(self.layout.fs(sid))
        return usage

    def prepare(self, key: str, parent: str,
                labels: Optional[Mapping[str, str]] = None) -> List[Mount]:
        for hook in self._prepare_hooks:
            hook(self, key, parent, labels or {})
        return self._create(KIND_ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str,
             labels: Optional[Mapping[str, str]] = None) -> List[Mount]:
        return self._create(KIND_VIEW, key, parent, labels)

    def mounts(self, key: str) -> List[Mount]:
        try:
            with self.ms.transaction() as tx:
                snap = tx.get_snapshot(key)
        except SnapshotterError as e:
            raise e.wrap("failed to get active mount") from None
        return self._mounts(snap)

    def commit(self, name: str, key: str,
               labels: Optional[Mapping[str, str]] = None) -> None:
        with self.ms.transaction() as tx:
            sid, info, _ = tx.get_info(key)
        usage, remote = Usage(), None
        if info.kind == KIND_ACTIVE:  # otherwise commit_active refuses it below
            usage = disk_usage(self.layout.fs(sid))
            remote = self._remote_of(sid)
            if self.sync_commits:
                host_mounts.syncfs(self.layout.fs(sid))
        with self._writing(f"failed to commit snapshot {key}") as tx:
            now_id, now_info, _ = tx.get_info(key)
            if now_id != sid and now_info.kind == KIND_ACTIVE:
                # removed and prepared again meanwhile: measure that one
                usage = disk_usage(self.layout.fs(now_id))
                remote = self._remote_of(now_id)
            try:
                tx.commit_active(key, name, usage, labels, remote)
            except SnapshotterError as e:
                raise e.wrap("failed to commit snapshot") from None

    def remove(self, key: str) -> None:
        # The order. Normally the metadata goes first (containerd's order): only once the
        # removal is committed does the directory go, so a crash or a failed commit before
        # then leaves the snapshot whole, and a crash after it leaves an orphan directory,
        # which start-up, Cleanup or the next Remove deletes.
        #
        # On a full disk that commit cannot be written (SQLite's WAL must grow), and
        # Remove is how containerd frees space: then the files go first. Under one write
        # transaction (no child can appear meanwhile) the row is checked and deleted, the
        # directory renamed into staging/ as a tombstone `del-<id>-…` (a rename needs no
        # free block) and emptied, and only then is the transaction committed, with the
        # space it needs now free. The tombstone stays until the row is gone: it records
        # that the removal was decided. If the commit still fails, or the daemon dies
        # before it, start-up (and Cleanup) empty the tombstones, forget their ids' rows,
        # and only then empty staging/: after a restart, no snapshot whose directory is
        # gone is reported. Until then (the commit failed; the error says the disk is
        # full) the snapshot is listed without its files, and the next Remove ends it.
        # A tombstone cannot name another snapshot: ids are never reused (AUTOINCREMENT)
        # once committed, and the tombstoned id was.
        try:
            with self._writing(f"failed to remove snapshot {key}") as tx:
                sid = self._forget(tx, key)
        except StoreFull as e:
            log.warning("%s: removing its files first to free space", e)
            with self._writing(f"failed to remove snapshot {key}") as tx:
                sid = self._forget(tx, key)
                self._empty(self._to_tombstone(sid))
        with self.ms.transaction(write=True) as tx:
            trash = self._orphans_to_staging(tx.id_map())
            trash += self._tombstones(sid)  # committed: its tombstone is done with
        self._delete(trash)

    def walk(self, filter_strings: Sequence[str] = ()) -> List[Info]:
        with self.ms.transaction() as tx:
            return tx.walk(filter_strings)

    def cleanup(self) -> None:
        with self._writing("failed to clean up") as tx:
            self._finish_removals(tx)
            trash = self._orphans_to_staging(tx.id_map())
            trash += [os.path.join(self.layout.staging, n)
                      for n in os.listdir(self.layout.staging)
                      if os.path.join(self.layout.staging, n) not in trash]
        self._delete(trash)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.ms.close()
            os.close(self._lock_fd)  # releases the home

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[Transaction]:
        """A write transaction for `what` ("failed to commit snapshot k"): its storage
        errors, a full disk above all, say what they stopped, and which snapshot."""
        try:
            with self.ms.transaction(write=True) as tx:
                yield tx
        except (StoreError, StoreFull) as e:
            raise e.wrap(what) from None
        except OSError as e:
            if e.errno not in DISK_FULL_ERRNOS:
                raise
            raise ResourceExhausted(
                f"{what}: disk full: {e.strerror}: {e.filename}") from None

    @staticmethod
    def _forget(tx: Transaction, key: str) -> str:
        try:
            return tx.remove(key)[0]
        except SnapshotterError as e:
            raise e.wrap("failed to remove") from None

    def _to_tombstone(self, sid: str) -> str:
        """Rename snapshots/<sid> into staging/ as its tombstone (its path), durably: a
        rename takes no free block, and staging/ is on the same file system."""
        tomb = os.path.join(self.layout.staging,
                            f"{TOMBSTONE_PREFIX}{sid}-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self.layout.dir(sid), tomb)
        except FileNotFoundError:  # a removal that freed it before, then failed its commit
            return tomb
        fsync_dir(self.layout.staging)  # the tombstone before any file of it goes
        fsync_dir(self.layout.snapshots)
        return tomb

    def _tombstones(self, sid: Optional[str] = None) -> List[str]:
        """The tombstones in staging/ (of snapshot `sid` only, if given)."""
        prefix = TOMBSTONE_PREFIX + (f"{sid}-" if sid is not None else "")
        return [os.path.join(self.layout.staging, n)
                for n in sorted(os.listdir(self.layout.staging)) if n.startswith(prefix)]

    def _empty(self, path: str) -> None:
        """Delete what is in the directory `path`, not the directory: the space is free,
        the tombstone stays."""
        with self._removing, contextlib.suppress(FileNotFoundError):
            for name in os.listdir(path):
                _remove_tree(os.path.join(path, name))

    def _finish_removals(self, tx: Transaction) -> None:
        """Complete the removals whose files went first (tombstones in staging/): empty
        each, then forget its snapshot's row, in `tx` (it commits with space freed)."""
        for tomb in self._tombstones():
            sid = os.path.basename(tomb)[len(TOMBSTONE_PREFIX):].split("-", 1)[0]
            self._empty(tomb)
            if not sid.isdigit():
                continue
            if tx.forget(sid):
                log.warning("finished the removal of snapshot %s (its files went first)", sid)
            elif tx.has_children(sid):  # cannot happen: Remove refused those
                log.error("snapshot %s has children, though its directory was removed", sid)

    def _create(self, kind: int, key: str, parent: str,
                labels: Optional[Mapping[str, str]]) -> List[Mount]:
        # Resolve the parents' lower directories before taking the write lock: a remote
        # resolver may be slow the first time (masks), and if it fails nothing is created.
        with self.ms.transaction() as tx:
            chain = tx.parent_chain(parent)
        resolved = (chain, self._lower_dirs(chain)) if chain else None
        with self._writing(f"failed to create snapshot {key}") as tx:
            td = tempfile.mkdtemp(prefix="new-", dir=self.layout.staging)
            try:
                os.mkdir(os.path.join(td, "fs"))
                os.chmod(os.path.join(td, "fs"), 0o755)
                if kind == KIND_ACTIVE:
                    os.mkdir(os.path.join(td, "work"))
                    os.chmod(os.path.join(td, "work"), 0o711)
                try:
                    snap = tx.create_snapshot(kind, key, parent, labels)
                except SnapshotterError as e:
                    raise e.wrap("failed to create snapshot") from None
                if resolved is not None and resolved[0] == snap.parents:
                    lowers = resolved[1]
                else:  # the parent was replaced in between: resolve again
                    lowers = self._lower_dirs(snap.parents)
                if snap.parents:
                    top = lowers[0]
                    try:
                        st = os.stat(top)
                    except OSError as e:
                        raise FailedPrecondition(
                            f"failed to stat parent: {e.strerror}: {top}") from None
                    os.lchown(os.path.join(td, "fs"), st.st_uid, st.st_gid)
                mounts = self._mounts(snap, lowers)
                self._put_in_place(td, snap.id)
            except BaseException:
                _remove_tree(td)
                raise
        return mounts

    def _put_in_place(self, staged: str, sid: str) -> None:
        """Rename a staged directory to snapshots/<id>, durably (inside the transaction)."""
        fsync_dir(staged)
        target = self.layout.dir(sid)
        if os.path.lexists(target):
            # Left by a create whose transaction never committed (same id, sequence
            # rolled back): no snapshot owns it.
            log.warning("replacing leftover directory %s of an unrecorded snapshot", target)
            _remove_tree(target)
        os.rename(staged, target)
        fsync_dir(self.layout.snapshots)

    def _lower_dirs(self, parents: Iterable[Lower]) -> List[str]:
        dirs: List[str] = []
        chain = list(parents)
        for i, p in enumerate(chain):
            if p.remote is None:
                dirs.append(self.layout.fs(p.id))
                continue
            kind = p.remote.get("type")
            resolver = self._resolvers.get(kind) if isinstance(kind, str) else None
            if resolver is None:
                raise FailedPrecondition(
                    f"snapshot {p.id} is a remote snapshot of type {kind!r}, which this "
                    "daemon cannot mount")
            resolved = resolver(self.layout, p, i + 1 < len(chain))
            if not resolved:
                raise FailedPrecondition(f"remote snapshot {p.id} resolved to no directory")
            # An image may hold one layer twice (the same published directory); overlayfs
            # refuses a lowerdir given twice, and the upper copy shows all the lower one
            # would: leave the lower one out.
            dirs.extend(d for d in resolved if d not in dirs)
        return dirs

    def _mounts(self, snap: Snapshot, lowers: Optional[List[str]] = None) -> List[Mount]:
        if lowers is None:
            lowers = self._lower_dirs(snap.parents)
        return snapshot_mounts(
            active=snap.kind == KIND_ACTIVE, upper=self.layout.fs(snap.id),
            work=self.layout.work(snap.id), lowers=lowers, opts=self.options)

    def _orphans_to_staging(self, ids: Mapping[str, str]) -> List[str]:
        """Move every snapshots/ entry no snapshot owns into staging/ (under the
        transaction, so no create is half-way); returns their new paths."""
        moved = []
        for name in os.listdir(self.layout.snapshots):
            if name in ids:
                continue
            src = os.path.join(self.layout.snapshots, name)
            # A plain rename, no new directory: it needs no free block on a full disk.
            dst = os.path.join(self.layout.staging, f"rm-{name}-{uuid.uuid4().hex[:12]}")
            try:
                os.rename(src, dst)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("cannot move %s aside for removal: %s", src, e)
                continue
            moved.append(dst)
        return moved

    def _delete(self, paths: Sequence[str]) -> None:
        with self._removing:
            for path in paths:
                _remove_tree(path)


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's labels.Validate: a key and value together at most 4096 bytes."""
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > 4096:
            raise InvalidArgument(
                f"label key and value greater than maximum size (4096 bytes), key: {k[:10]}")
