"""The metadata store alone (no root, no mounts): containerd's storage semantics, durability."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from cvmfs_graphdriver.snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from cvmfs_graphdriver.snapshotter.metastore import (
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_VIEW,
    Lower,
    MetaStore,
    MetaStoreError,
    Usage,
)


@pytest.fixture
def ms(tmp_path):
    store = MetaStore(str(tmp_path / "metadata.db"))
    yield store
    store.close()


def test_database_is_wal_with_full_sync(ms, tmp_path):
    db = sqlite3.connect(str(tmp_path / "metadata.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with ms._tx(write=False) as conn:  # synchronous is per connection: ask the store's own
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_create_commit_chain_and_ids(ms):
    with ms.transaction(write=True) as tx:
        a = tx.create_snapshot(KIND_ACTIVE, "a", "", {"x": "1", "empty": ""})
        assert (a.id, a.parents) == ("1", ())
    with ms.transaction(write=True) as tx:
        assert tx.commit_active("a", "A", Usage(size=10, inodes=2), {"y": "2"}) == "1"
        tx.create_snapshot(KIND_ACTIVE, "b", "A")
        tx.commit_active("b", "B", Usage())
        v = tx.create_snapshot(KIND_VIEW, "v", "B")
    assert v.parent_ids == ["2", "1"]  # immediate parent first, as containerd's ParentIDs
    with ms.transaction() as tx:
        sid, info, usage = tx.get_info("A")
        assert (sid, info.kind, info.parent, dict(info.labels)) == ("1", KIND_COMMITTED, "",
                                                                   {"y": "2"})
        assert info.created_ns == info.updated_ns
        assert usage == Usage(size=10, inodes=2)
        assert tx.get_info("B")[1].parent == "A"
        assert tx.get_snapshot("v") == v
        with pytest.raises(NotFound):
            tx.get_info("a")  # the key is gone once committed


def test_errors_in_containerds_order(ms):
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "a", "")
    with ms.transaction(write=True) as tx, pytest.raises(InvalidArgument, match="not committed"):
        tx.create_snapshot(KIND_ACTIVE, "b", "a")
    with ms.transaction(write=True) as tx, pytest.raises(NotFound, match="missing parent"):
        tx.create_snapshot(KIND_ACTIVE, "a", "nope")  # parent checked before the key
    with ms.transaction(write=True) as tx, pytest.raises(AlreadyExists):
        tx.create_snapshot(KIND_VIEW, "a", "")
    with ms.transaction(write=True) as tx, pytest.raises(InvalidArgument):
        tx.create_snapshot(KIND_COMMITTED, "c", "")
    with ms.transaction(write=True) as tx, pytest.raises(InvalidArgument):
        tx.create_snapshot(KIND_ACTIVE, "", "")
    with ms.transaction(write=True) as tx, pytest.raises(AlreadyExists):
        tx.commit_active("a", "a", Usage())  # name checked before the key
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_VIEW, "v", "")
    with ms.transaction(write=True) as tx, pytest.raises(FailedPrecondition, match="not active"):
        tx.commit_active("v", "V", Usage())
    with ms.transaction(write=True) as tx, pytest.raises(NotFound):
        tx.commit_active("nope", "N", Usage())
    with ms.transaction(write=True) as tx:
        tx.commit_active("a", "A", Usage())
    with ms.transaction() as tx, pytest.raises(FailedPrecondition, match="not active or view"):
        tx.get_snapshot("A")
    with ms.transaction() as tx, pytest.raises(RuntimeError, match="read-only"):
        tx.create_snapshot(KIND_ACTIVE, "x", "")


def test_a_failed_transaction_changes_nothing(ms):
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "a", "")
    with pytest.raises(RuntimeError), ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "b", "")
        raise RuntimeError("the rename failed")
    with ms.transaction() as tx:
        assert [i.name for i in tx.walk()] == ["a"]


def test_remove_refuses_parents_and_ids_are_never_reused(ms):
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "a", "")
        tx.commit_active("a", "A", Usage())
        tx.create_snapshot(KIND_VIEW, "v", "A")
    with ms.transaction(write=True) as tx, pytest.raises(FailedPrecondition, match="child"):
        tx.remove("A")
    with ms.transaction(write=True) as tx:
        assert tx.remove("v") == ("2", KIND_VIEW)
        assert tx.remove("A") == ("1", KIND_COMMITTED)
        with pytest.raises(NotFound):
            tx.remove("A")
        assert tx.create_snapshot(KIND_ACTIVE, "a", "").id == "3"
        assert tx.id_map() == {"3": "a"}


def test_update_labels_as_containerd(ms):
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "a", "", {"l1": "v1", "l2": "v2", "l3": "v3"})
        created = tx.get_info("a")[1].created_ns
    time.sleep(0.01)
    with ms.transaction(write=True) as tx:
        info = tx.update_info("a", {"l1": "updated", "l4": "v4"}, ["labels.l1", "labels.l2"])
    assert dict(info.labels) == {"l1": "updated", "l3": "v3"}  # l2 unset: removed
    assert info.created_ns == created < info.updated_ns
    with ms.transaction(write=True) as tx:
        assert dict(tx.update_info("a", {"x": "1"}, ["labels"]).labels) == {"x": "1"}
        assert dict(tx.update_info("a", {"y": "1", "z": ""}).labels) == {"y": "1"}
        with pytest.raises(InvalidArgument, match='"parent"'):
            tx.update_info("a", {}, ["parent"])
        with pytest.raises(NotFound):
            tx.update_info("nope", {})
    with ms.transaction() as tx:
        assert dict(tx.get_info("a")[1].labels) == {"y": "1"}


def test_walk_filters_and_bad_filter(ms):
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "b", "", {"containerd.io/snapshot.ref": "c1"})
        tx.commit_active("b", "c1", Usage(), {"containerd.io/snapshot.ref": "c1"})
        tx.create_snapshot(KIND_ACTIVE, "a", "c1")
    with ms.transaction() as tx:
        assert [i.name for i in tx.walk()] == ["a", "c1"]  # key order, as bolt
        assert [i.name for i in tx.walk(
            ['labels."containerd.io/snapshot.ref"==c1,parent==""'])] == ["c1"]
        with pytest.raises(InvalidArgument, match="parse error"):
            tx.walk(["name==,"])


def test_remote_committed_snapshot_record(ms):
    """The hook for lazy layers: a committed snapshot recorded with a remote object."""
    with ms.transaction(write=True) as tx:
        base = tx.create_committed("sha256:c1", "", {"type": "cvmfs", "dir": "/cvmfs/r/x"},
                                   Usage(), {"containerd.io/snapshot.ref": "sha256:c1"})
        with pytest.raises(AlreadyExists):
            tx.create_committed("sha256:c1", "", {"type": "cvmfs"})
        with pytest.raises(InvalidArgument, match="type"):
            tx.create_committed("x", "", {"dir": "/"})
        tx.create_snapshot(KIND_ACTIVE, "a", "sha256:c1")
        tx.commit_active("a", "local", Usage())
        snap = tx.create_snapshot(KIND_ACTIVE, "top", "local")
    assert snap.parents == (Lower("2"), Lower(base, {"type": "cvmfs", "dir": "/cvmfs/r/x"}))
    with ms.transaction() as tx:
        info = tx.get_info("sha256:c1")[1]
        assert info.kind == KIND_COMMITTED and info.parent == ""
        assert tx.get_remote("sha256:c1") == {"type": "cvmfs", "dir": "/cvmfs/r/x"}
        assert tx.get_remote("local") is None


def test_reopen_keeps_everything(tmp_path):
    path = str(tmp_path / "m.db")
    ms = MetaStore(path)
    with ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "a", "", {"k": "v"})
        tx.commit_active("a", "A", Usage(5, 1))
        tx.create_snapshot(KIND_ACTIVE, "gone", "")
        tx.remove("gone")
    ms.close()
    ms = MetaStore(path)
    with ms.transaction(write=True) as tx:
        assert tx.get_info("A")[2] == Usage(5, 1)
        assert tx.create_snapshot(KIND_VIEW, "v", "A").id == "3"  # 2 was used, never again
    ms.close()


def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "m.db")
    MetaStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(MetaStoreError, match="newer"):
        MetaStore(path)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "m.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MetaStoreError, match=str(path)):
        MetaStore(str(path))


WRITER = textwrap.dedent("""
    import sys
    from cvmfs_graphdriver.snapshotter.metastore import MetaStore, KIND_ACTIVE, Usage
    ms = MetaStore(sys.argv[1])
    i = 0
    while True:
        with ms.transaction(write=True) as tx:
            tx.create_snapshot(KIND_ACTIVE, f"a{i}", "")
            tx.commit_active(f"a{i}", f"c{i}", Usage(i, i))
        print(i, flush=True)  # c<i> is committed: it must survive a kill -9
        i += 1
""")


def test_kill_9_loses_no_committed_transaction(tmp_path):
    path = str(tmp_path / "m.db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    acknowledged = -1
    deadline = time.monotonic() + 60
    while acknowledged < 30 and time.monotonic() < deadline:
        acknowledged = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert acknowledged >= 30
    ms = MetaStore(path)
    with ms.transaction() as tx:
        infos = {i.name: i for i in tx.walk()}
    ms.close()
    for i in range(acknowledged + 1):
        assert f"c{i}" in infos, f"c{i} was committed before the kill and is gone"
    # a transaction is all or nothing: never an active left half-way to committed
    assert all(i.kind == KIND_COMMITTED for i in infos.values())
    assert os.path.exists(path + "-wal") or os.path.getsize(path) > 0


def test_a_failed_commit_leaves_no_transaction_open(ms):
    """A COMMIT that fails (disk full, I/O error) must not leave the connection inside a
    transaction, or every later BEGIN fails until a restart."""

    class FailingCommit:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)

    real = ms._db
    ms._db = FailingCommit(real)
    with pytest.raises(ResourceExhausted, match="disk full: cannot write snapshot metadata "
                       ".*disk is full") as failed, ms.transaction(write=True) as tx:
        tx.create_snapshot(KIND_ACTIVE, "lost", "", {})
    assert isinstance(failed.value.__cause__, sqlite3.OperationalError)  # SQLite's own
    ms._db = real
    assert not real.in_transaction
    with ms.transaction(write=True) as tx:  # works again, and nothing was recorded
        tx.create_snapshot(KIND_ACTIVE, "kept", "", {})
    with ms.transaction() as tx:
        assert [i.name for i in tx.walk([])] == ["kept"]
