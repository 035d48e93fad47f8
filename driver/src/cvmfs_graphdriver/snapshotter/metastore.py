"""Snapshot metadata in SQLite: containerd's snapshots/storage (bolt) semantics, made durable.

One table holds every snapshot, keyed by its key (an active or view) or its name (a
committed one): the same namespace, as in containerd, so a key and a name never clash.

    snapshots(id       INTEGER PRIMARY KEY AUTOINCREMENT   -- never reused: names dirs
              key      TEXT UNIQUE                         -- key or committed name
              kind     1 view | 2 active | 3 committed     -- containerd's snapshots.Kind
              parent_id                                    -- a committed snapshot or NULL
              created_ns, updated_ns                       -- UTC nanoseconds
              size, inodes                                 -- usage recorded at commit
              labels   TEXT                                -- JSON object, no empty values
              remote   TEXT)                               -- NULL: the lower dir is the
                                                           -- snapshot's own fs/; else a
                                                           -- JSON object for a resolver

Durability: WAL journal with synchronous=FULL, so a transaction that returned is on disk
when the process is killed or the machine loses power; every write is one transaction
(`BEGIN IMMEDIATE` … `COMMIT`), so a crash leaves the state before or after it.
AUTOINCREMENT makes ids monotonic across restarts: a directory left by a create whose
transaction never committed can never be mistaken for a later snapshot's.

`remote` is how a committed snapshot whose files are not under its own `fs/` is recorded
(a CVMFS layer plus whiteout masks, for lazy pulls and thin images): the metastore keeps
the JSON object as given and hands it back in every parent chain; what it means is the
business of the resolver registered with the snapshotter for its `"type"`.

The functions mirror containerd's storage package (`CreateSnapshot`, `CommitActive`,
`Remove`, `UpdateInfo`, `GetInfo`, `GetSnapshot`, `WalkInfo`, `IDMap`), with its error
classes and checks in the same order.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from . import filters
from .errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotterError,
)

KIND_UNKNOWN, KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED = 0, 1, 2, 3
KIND_NAMES = {KIND_VIEW: "view", KIND_ACTIVE: "active", KIND_COMMITTED: "committed"}

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL UNIQUE,
    kind       INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent_id  INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0,
    labels     TEXT    NOT NULL DEFAULT '{}',
    remote     TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


class MetaStoreError(Exception):
    """The database cannot be used (newer schema, corrupt file); says what to do."""


class StoreError(SnapshotterError):
    """A read or write of the metadata failed (an I/O error): Unknown, with SQLite's
    message. The caller puts the snapshot it was working on in front (`wrap`)."""


class StoreFull(ResourceExhausted):
    """The metadata cannot be written: the disk holding it is full (SQLITE_FULL: the WAL
    cannot grow)."""


SQLITE_FULL = 13  # the primary result code; extended codes keep it in the low byte


def store_error(path: str, e: sqlite3.Error) -> SnapshotterError:
    """What a failed SQLite call on the database at `path` is to the snapshotter."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    if (isinstance(code, int) and code & 0xFF == SQLITE_FULL) \
            or "database or disk is full" in str(e):
        return StoreFull(f"disk full: cannot write snapshot metadata {path} ({e})")
    return StoreError(f"snapshot metadata {path}: {e}")


@dataclass(frozen=True)
class Info:
    """containerd's snapshots.Info."""

    name: str
    parent: str = ""
    kind: int = KIND_UNKNOWN
    created_ns: int = 0
    updated_ns: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Lower:
    """A committed snapshot in a parent chain: its id and, if remote, its record."""

    id: str
    remote: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot with its parent chain, immediate parent first (the
    order containerd's storage.GetSnapshot returns ParentIDs in, and overlay's lowerdir)."""

    kind: int
    id: str
    parents: Tuple[Lower, ...] = ()

    @property
    def parent_ids(self) -> List[str]:
        return [p.id for p in self.parents]


def now_ns() -> int:
    return time.time_ns()


def clean_labels(labels: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Labels as stored: empty values are dropped (containerd's boltutil.WriteLabels)."""
    return {k: v for k, v in (labels or {}).items() if v != ""}


def _labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), ensure_ascii=False, separators=(",", ":"))


def adapt(info: Info) -> filters.Adaptor:
    """containerd's storage.adaptSnapshot: the fields filters may name."""

    def field_of(path: Sequence[str]) -> Tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            name = KIND_NAMES.get(info.kind)
            return (name, True) if name else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            if key in info.labels:
                return info.labels[key], True
            return "", False
        return "", False

    return field_of


class MetaStore:
    """The metadata database at `path` (created on first use)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db: Optional[sqlite3.Connection] = sqlite3.connect(
                path, timeout=60, isolation_level=None, check_same_thread=False)
            db = self._db
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise MetaStoreError(f"{path}: cannot use a WAL journal (got {mode!r})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            with self._tx(write=True):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta(name, value) VALUES('schema', ?)",
                               (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise MetaStoreError(
                        f"{path} has schema version {row[0]}, newer than this program's "
                        f"({SCHEMA_VERSION}): run the newer cvmfs-graphdriver, or move the "
                        "home aside")
        except sqlite3.DatabaseError as e:
            raise MetaStoreError(f"cannot open snapshot metadata {path}: {e}") from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _tx(self, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            if db is None:
                raise MetaStoreError(f"{self.path}: the metadata store is closed")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL, I/O errors): a second
                # ROLLBACK would fail and hide the error that matters.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
            if not write:
                db.execute("ROLLBACK")
                return
            try:
                db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (disk full, I/O error) may leave the transaction
                # open: end it, or every later BEGIN fails until a restart.
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        """A transaction; a writable one commits when the block ends without an error.

        Transactions are serialised (one connection, one lock): file system work done
        inside the block (the rename that puts a new snapshot in place) is atomic with
        the metadata change as far as other requests can see.

        SQLite's own failures (a full disk above all) come out as StoreFull or
        StoreError, snapshotter errors the gRPC service answers with a code.
        """
        try:
            with self._tx(write) as db:
                yield Transaction(db, write)
        except sqlite3.Error as e:
            raise store_error(self.path, e) from e


@contextlib.contextmanager
def read_only(path: str, timeout: float = 10) -> Iterator[Transaction]:
    """A read-only transaction on the database at `path` in a connection of its own, for
    readers beside the daemon (`status`, the metrics thread): it never takes a
    MetaStore's lock, so the daemon's requests do not wait for it, and SQLite's WAL lets
    it see the last commit while the daemon writes. Raises sqlite3.Error as SQLite
    does (a missing file too: it is opened read-only, never created)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout,
                         isolation_level=None, check_same_thread=False)
    try:
        db.execute("BEGIN")
        yield Transaction(db, writable=False)
    finally:
        db.close()  # nothing was written: closing ends the transaction


class Transaction:
    """Operations inside one transaction (containerd's storage functions)."""

    def __init__(self, db: sqlite3.Connection, writable: bool) -> None:
        self._db = db
        self.writable = writable

    def _need_write(self) -> None:
        if not self.writable:
            raise RuntimeError("write in a read-only transaction")

    def _row(self, key: str) -> Optional[sqlite3.Row]:
        cur = self._db.execute(
            "SELECT s.id, s.key, s.kind, p.key, s.created_ns, s.updated_ns, s.size, "
            "s.inodes, s.labels, s.remote, s.parent_id "
            "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.key = ?",
            (key,))
        return cur.fetchone()  # type: ignore[no-any-return]

    @staticmethod
    def _info(row: Any) -> Info:
        return Info(name=row[1], parent=row[3] or "", kind=row[2], created_ns=row[4],
                    updated_ns=row[5], labels=json.loads(row[8]))

    def _chain(self, snapshot_id: int) -> Tuple[Lower, ...]:
        rows = self._db.execute(
            "WITH RECURSIVE chain(id, parent_id, remote, depth) AS ("
            " SELECT id, parent_id, remote, 0 FROM snapshots WHERE id = ?"
            " UNION ALL"
            " SELECT s.id, s.parent_id, s.remote, c.depth + 1"
            " FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
            " SELECT id, remote FROM chain ORDER BY depth", (snapshot_id,)).fetchall()
        return tuple(Lower(str(r[0]), json.loads(r[1]) if r[1] else None) for r in rows)

    # ------------------------------------------------------------------ reads

    def get_info(self, key: str) -> Tuple[str, Info, Usage]:
        """The snapshot's id, Info and recorded usage (storage.GetInfo)."""
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return str(row[0]), self._info(row), Usage(size=row[6], inodes=row[7])

    def get_remote(self, key: str) -> Optional[Dict[str, Any]]:
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return json.loads(row[9]) if row[9] else None

    def get_snapshot(self, key: str) -> Snapshot:
        """An active or view snapshot with its parent chain (storage.GetSnapshot)."""
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        if row[2] not in (KIND_ACTIVE, KIND_VIEW):
            raise FailedPrecondition(f"requested snapshot {key} not active or view")
        parents = self._chain(row[10]) if row[10] is not None else ()
        return Snapshot(kind=row[2], id=str(row[0]), parents=parents)

    def parent_chain(self, parent: str) -> Tuple[Lower, ...]:
        """The chain a snapshot created on committed `parent` would have (no checks of
        what does not exist: create_snapshot reports those)."""
        row = self._row(parent) if parent else None
        if row is None or row[2] != KIND_COMMITTED:
            return ()
        return self._chain(row[0])

    def walk(self, filter_strings: Sequence[str] = ()) -> List[Info]:
        """Every snapshot matching any of the filters, in key order (storage.WalkInfo)."""
        try:
            match = filters.parse_all(filter_strings)
        except filters.FilterError as e:
            raise InvalidArgument(str(e)) from None
        rows = self._db.execute(
            "SELECT s.id, s.key, s.kind, p.key, s.created_ns, s.updated_ns, s.size, "
            "s.inodes, s.labels FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
            "ORDER BY s.key").fetchall()
        infos = [self._info(r) for r in rows]
        return [i for i in infos if match.match(adapt(i))]

    def id_map(self) -> Dict[str, str]:
        """Every snapshot id (a directory name under snapshots/) -> its key (storage.IDMap)."""
        return {str(r[0]): r[1] for r in self._db.execute("SELECT id, key FROM snapshots")}

    def has_children(self, snapshot_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1",
                                (int(snapshot_id),)).fetchone() is not None

    # ------------------------------------------------------------------ writes

    def _committed_parent(self, parent: str) -> Optional[sqlite3.Row]:
        if not parent:
            return None
        prow = self._row(parent)
        if prow is None:
            raise NotFound(f'missing parent "{parent}"')
        if prow[2] != KIND_COMMITTED:
            raise InvalidArgument(f'parent "{parent}" is not committed snapshot')
        return prow

    def create_snapshot(self, kind: int, key: str, parent: str,
                        labels: Optional[Mapping[str, str]] = None) -> Snapshot:
        """A new active or view snapshot on a committed parent (storage.CreateSnapshot)."""
        self._need_write()
        if kind not in (KIND_ACTIVE, KIND_VIEW):
            raise InvalidArgument(
                f"snapshot type {kind} invalid; only snapshots of type Active or View can "
                "be created")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        prow = self._committed_parent(parent)
        if self._row(key) is not None:
            raise AlreadyExists(f"snapshot {key}")
        t = now_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots(key, kind, parent_id, created_ns, updated_ns, labels) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, kind, prow[0] if prow else None, t, t, _labels_json(clean_labels(labels))))
        new_id = cur.lastrowid
        assert new_id is not None
        parents = self._chain(prow[0]) if prow is not None else ()
        return Snapshot(kind=kind, id=str(new_id), parents=parents)

    def commit_active(self, key: str, name: str, usage: Usage,
                      labels: Optional[Mapping[str, str]] = None,
                      remote: Optional[Mapping[str, Any]] = None) -> str:
        """Rename active `key` to committed `name`, keeping its id (storage.CommitActive).

        The labels are replaced, not inherited; created and updated are now. With `remote`
        (a thin image's layer, say), the committed snapshot is recorded as remote: children
        mount what its resolver returns instead of its fs/."""
        self._need_write()
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        if remote is not None and (not isinstance(remote.get("type"), str)
                                   or not remote["type"]):
            raise InvalidArgument(f"remote record of {name} has no \"type\": {dict(remote)}")
        if self._row(name) is not None:
            raise AlreadyExists(f"committed snapshot {name}")
        row = self._row(key)
        if row is None:
            raise NotFound(f"failed to get active snapshot {key!r}")
        if row[2] != KIND_ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        t = now_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, "
            "size = ?, inodes = ?, labels = ?, remote = ? WHERE id = ?",
            (name, KIND_COMMITTED, t, t, usage.size, usage.inodes,
             _labels_json(clean_labels(labels)),
             None if remote is None else json.dumps(dict(remote), sort_keys=True,
                                                    separators=(",", ":")),
             row[0]))
        return str(row[0])

    def create_committed(self, name: str, parent: str, remote: Mapping[str, Any],
                         usage: Optional[Usage] = None,
                         labels: Optional[Mapping[str, str]] = None) -> str:
        """Record a committed snapshot whose files live elsewhere (`remote`, a JSON object
        with a "type" for the resolver), on a committed parent. Returns its id.

        The hook for remote (lazy) layers: Prepare of a layer found in CVMFS records it
        here under the chain id, then answers AlreadyExists."""
        self._need_write()
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        if not isinstance(remote.get("type"), str) or not remote["type"]:
            raise InvalidArgument(f"remote record of {name} has no \"type\": {dict(remote)}")
        prow = self._committed_parent(parent)
        if self._row(name) is not None:
            raise AlreadyExists(f"snapshot {name}")
        usage = usage or Usage()
        t = now_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots(key, kind, parent_id, created_ns, updated_ns, size, "
            "inodes, labels, remote) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, KIND_COMMITTED, prow[0] if prow else None, t, t, usage.size,
             usage.inodes, _labels_json(clean_labels(labels)),
             json.dumps(dict(remote), sort_keys=True, separators=(",", ":"))))
        assert cur.lastrowid is not None
        return str(cur.lastrowid)

    def remove(self, key: str) -> Tuple[str, int]:
        """Forget `key`; refused while it has children (storage.Remove). Its id and kind."""
        self._need_write()
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key}")
        if self.has_children(str(row[0])):
            raise FailedPrecondition("cannot remove snapshot with child")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return str(row[0]), row[2]

    def forget(self, snapshot_id: str) -> bool:
        """Delete the row of `snapshot_id` if there is one and it has no children: the
        end of a removal whose directory went first (see OverlaySnapshotter.remove).
        Whether a row was deleted."""
        self._need_write()
        if self.has_children(snapshot_id):
            return False
        cur = self._db.execute("DELETE FROM snapshots WHERE id = ?", (int(snapshot_id),))
        return cur.rowcount > 0

    def update_info(self, name: str, labels: Optional[Mapping[str, str]],
                    fieldpaths: Sequence[str] = ()) -> Info:
        """Update the mutable fields, labels only (storage.UpdateInfo): `labels.KEY`
        sets or (with an empty or absent value) removes one label, `labels` replaces all,
        no paths replaces all; any other path is InvalidArgument."""
        self._need_write()
        row = self._row(name)
        if row is None:
            raise NotFound("snapshot does not exist")
        info = self._info(row)
        given = dict(labels or {})
        new_labels = dict(info.labels)
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels."):]
                    new_labels[k] = given.get(k, "")
                elif path == "labels":
                    new_labels = dict(given)
                else:
                    raise InvalidArgument(f'cannot update "{path}" field on snapshot "{name}"')
        else:
            new_labels = dict(given)
        new_labels = clean_labels(new_labels)
        t = now_ns()
        self._db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                         (_labels_json(new_labels), t, row[0]))
        return Info(name=info.name, parent=info.parent, kind=info.kind,
                    created_ns=info.created_ns, updated_ns=t, labels=new_labels)
