"""The snapshotter in process: the mounts it returns (pure), then real directories and real
overlay mounts (root): crash leftovers, Cleanup, the remote-snapshot hook."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from sntools import mounted, need

from cvmfs_graphdriver.snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from cvmfs_graphdriver.snapshotter.metastore import KIND_ACTIVE, KIND_COMMITTED, Lower, Usage
from cvmfs_graphdriver.snapshotter.mountspec import (
    Mount,
    MountOptions,
    running_in_userns,
    snapshot_mounts,
)
from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter, disk_usage

# ------------------------------------------------------------------ mounts (pure)

IDX = MountOptions(index_off=True)


def test_no_parent_is_a_bind_mount_rw_or_ro():
    assert snapshot_mounts(True, "/s/1/fs", "/s/1/work", [], IDX) == [
        Mount("bind", "/s/1/fs", ("rw", "rbind"))]
    assert snapshot_mounts(False, "/s/1/fs", "/s/1/work", [], IDX) == [
        Mount("bind", "/s/1/fs", ("ro", "rbind"))]


def test_a_view_of_one_lower_is_a_read_only_bind_of_it():
    assert snapshot_mounts(False, "/s/2/fs", "/s/2/work", ["/s/1/fs"], IDX) == [
        Mount("bind", "/s/1/fs", ("ro", "rbind"))]


def test_overlay_options_in_containerds_order():
    lowers = ["/s/3/fs", "/s/1/fs"]
    assert snapshot_mounts(True, "/s/4/fs", "/s/4/work", lowers,
                           MountOptions(index_off=True, userxattr=True)) == [
        Mount("overlay", "overlay", ("index=off", "userxattr", "workdir=/s/4/work",
                                     "upperdir=/s/4/fs", "lowerdir=/s/3/fs:/s/1/fs"))]
    assert snapshot_mounts(True, "/s/4/fs", "/s/4/work", ["/s/1/fs"], MountOptions()) == [
        Mount("overlay", "overlay", ("workdir=/s/4/work", "upperdir=/s/4/fs",
                                     "lowerdir=/s/1/fs"))]
    assert snapshot_mounts(False, "/s/4/fs", "/s/4/work", lowers, IDX) == [
        Mount("overlay", "overlay", ("index=off", "lowerdir=/s/3/fs:/s/1/fs"))]


def test_userns_detection_reads_uid_map(tmp_path):
    host = tmp_path / "host"
    host.write_text("         0          0 4294967295\n")
    inner = tmp_path / "inner"
    inner.write_text("         0     100000      65536\n")
    assert running_in_userns(str(host)) is False
    assert running_in_userns(str(inner)) is True


# ------------------------------------------------------------------ real directories


@pytest.fixture
def sn(tmp_path):
    need(os.geteuid() == 0, "needs root (chown, overlay mounts)")
    s = OverlaySnapshotter(str(tmp_path / "home"), sync_commits=False)
    yield s
    s.close()


def test_layout_modes_and_owner_of_new_snapshot(sn, tmp_path):
    sn.prepare("a", "")
    fs = sn.layout.fs("1")
    assert oct(os.stat(fs).st_mode & 0o7777) == "0o755"
    assert oct(os.stat(sn.layout.work("1")).st_mode & 0o7777) == "0o711"
    os.chown(fs, 1234, 5678)  # the new snapshot's fs/ takes its parent's owner
    sn.commit("A", "a")
    sn.prepare("b", "A")
    st = os.stat(sn.layout.fs("2"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    sn.view("v", "")
    assert not os.path.exists(sn.layout.work("3"))  # views have no work dir
    assert sorted(os.listdir(sn.layout.snapshots)) == ["1", "2", "3"]
    assert os.listdir(sn.layout.staging) == []


def test_files_written_through_the_mounts_stack_up(sn, tmp_path):
    with mounted(sn.prepare("a", ""), str(tmp_path / "m1")) as m:
        os.mkdir(f"{m}/dir")
        for name in ("keep", "gone", "dir/old"):
            with open(f"{m}/{name}", "w") as f:
                f.write(name)
    sn.commit("A", "a")
    with mounted(sn.prepare("b", "A"), str(tmp_path / "m2")) as m:
        os.remove(f"{m}/gone")
        subprocess.run(["rm", "-rf", f"{m}/dir"], check=True)
        os.mkdir(f"{m}/dir")
        with open(f"{m}/dir/new", "w") as f:
            f.write("new")
    assert sn.usage("b").inodes >= 3
    sn.commit("B", "b")
    with mounted(sn.view("v", "B"), str(tmp_path / "m3")) as m:
        assert sorted(os.listdir(m)) == ["dir", "keep"]
        assert os.listdir(f"{m}/dir") == ["new"]
        with pytest.raises(OSError), open(f"{m}/x", "w"):
            pass  # a view is read-only


def test_usage_is_containerds_disk_usage(sn, tmp_path):
    with mounted(sn.prepare("a", ""), str(tmp_path / "m")) as m:
        with open(f"{m}/f", "wb") as f:
            f.write(b"x" * 10000)
        os.link(f"{m}/f", f"{m}/hl")  # counted once
        os.symlink("f", f"{m}/sym")
    u = sn.usage("a")
    assert u == disk_usage(sn.layout.fs("1"))
    assert u.inodes == 3  # the root, f (with hl), sym
    sn.commit("A", "a")
    assert sn.usage("A") == u  # recorded at commit
    with open(os.path.join(sn.layout.fs("1"), "later"), "w") as f:
        f.write("not counted any more")
    assert sn.usage("A") == u


def test_errors_and_nothing_changes(sn):
    sn.prepare("a", "")
    sn.view("v", "")

    def state():
        return (sorted(os.listdir(sn.layout.snapshots)), os.listdir(sn.layout.staging),
                [(i.name, i.kind, i.parent, dict(i.labels)) for i in sn.walk()])

    before = state()
    with pytest.raises(InvalidArgument, match="failed to create snapshot"):
        sn.prepare("b", "a")  # parent not committed
    with pytest.raises(NotFound):
        sn.view("b", "nope")
    with pytest.raises(AlreadyExists):
        sn.prepare("a", "")
    with pytest.raises(InvalidArgument):
        sn.prepare("", "")
    with pytest.raises(NotFound):
        sn.commit("A", "nope")
    with pytest.raises(FailedPrecondition, match="not active"):
        sn.commit("V", "v")
    with pytest.raises(AlreadyExists):
        sn.commit("v", "a")
    with pytest.raises(NotFound, match="failed to remove"):
        sn.remove("nope")
    with pytest.raises(InvalidArgument):
        sn.update("a", {"x": "y"}, ["kind"])
    with pytest.raises(InvalidArgument):
        sn.walk(["kind=="])
    assert state() == before
    sn.commit("A", "a")
    with pytest.raises(FailedPrecondition, match="failed to get active mount"):
        sn.mounts("A")


def test_remove_deletes_its_directory_and_orphans(sn):
    sn.prepare("a", "")
    orphan = os.path.join(sn.layout.snapshots, "999")
    os.makedirs(orphan + "/fs")
    sn.remove("a")
    assert os.listdir(sn.layout.snapshots) == []
    assert os.listdir(sn.layout.staging) == []


def test_leftovers_of_a_crash_are_cleaned(sn, tmp_path):
    """What a kill -9 can leave: a staging dir (create interrupted before its rename) and a
    snapshots/<id> dir whose transaction never committed."""
    sn.prepare("a", "")
    os.makedirs(os.path.join(sn.layout.staging, "new-half", "fs"))
    os.makedirs(os.path.join(sn.layout.snapshots, "2", "fs"))  # id 2: never committed
    with open(os.path.join(sn.layout.snapshots, "2", "fs", "junk"), "w") as f:
        f.write("x")
    home = sn.layout.home
    sn.close()
    again = OverlaySnapshotter(home, sync_commits=False)
    assert os.listdir(again.layout.staging) == []  # emptied at start
    # the next snapshot gets id 2 again (its create never committed) and a clean directory
    again.prepare("b", "")
    assert os.listdir(again.layout.fs("2")) == []
    os.makedirs(os.path.join(again.layout.snapshots, "77", "fs"))
    again.cleanup()
    assert sorted(os.listdir(again.layout.snapshots)) == ["1", "2"]
    assert [i.name for i in again.walk()] == ["a", "b"]
    again.close()


def test_home_on_overlayfs_is_refused(tmp_path):
    need(os.geteuid() == 0, "needs root (overlay mount)")
    for d in ("lower", "upper", "work", "merged"):
        os.mkdir(tmp_path / d)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
                    f"workdir={tmp_path}/work", str(tmp_path / "merged")], check=True)
    try:
        with pytest.raises(Exception, match="overlayfs"):
            OverlaySnapshotter(str(tmp_path / "merged" / "home"))
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "merged")], check=False)


# ------------------------------------------------------------------ remote hook


def test_remote_committed_snapshot_is_mounted_through_its_resolver(sn, tmp_path):
    """The hook the lazy/thin layers use: a committed snapshot recorded as remote, whose
    lower directories (a mask over a layer directory) come from a registered resolver."""
    layer = tmp_path / "cvmfs" / "layerfs"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "from-layer").write_text("layer")
    (layer / "gone").write_text("deleted by the mask")
    calls = []

    def resolver(layout, lower: Lower, has_parent: bool):
        calls.append(lower)
        return [os.path.join(layout.dir(lower.id), "mask"), lower.remote["dir"]]

    def populate(staged: str) -> None:
        os.mkdir(os.path.join(staged, "mask"))
        os.mknod(os.path.join(staged, "mask", "gone"), 0o600 | 0o020000, os.makedev(0, 0))

    sn.register_remote("test-layer", resolver)
    sid = sn.commit_remote("sha256:chain", "", {"type": "test-layer", "dir": str(layer)},
                           labels={"containerd.io/snapshot.ref": "sha256:chain"},
                           populate=populate)
    with pytest.raises(AlreadyExists):
        sn.commit_remote("sha256:chain", "", {"type": "test-layer", "dir": str(layer)})
    info = sn.stat("sha256:chain")
    assert (info.kind, dict(info.labels)) == (KIND_COMMITTED,
                                             {"containerd.io/snapshot.ref": "sha256:chain"})
    assert [i.name for i in sn.walk(
        ['labels."containerd.io/snapshot.ref"==sha256:chain,parent==""'])] == ["sha256:chain"]
    assert sn.usage("sha256:chain") == Usage()
    mounts = sn.prepare("c", "sha256:chain")
    assert mounts[0].type == "overlay"
    assert mounts[0].options[-1] == (
        f"lowerdir={sn.layout.dir(sid)}/mask:{layer}")
    # a view of a remote parent that expands to two directories is an overlay, not a bind
    view = sn.view("v", "sha256:chain")
    assert view[0].type == "overlay" and view[0].options[-1] == mounts[0].options[-1]
    with mounted(mounts, str(tmp_path / "m")) as m:
        assert sorted(os.listdir(m)) == ["etc"]
        with open(f"{m}/etc/from-layer") as f:
            assert f.read() == "layer"
    assert all(c.id == sid and c.remote and c.remote["type"] == "test-layer" for c in calls)
    # an unknown type is refused with a clear error and changes nothing
    sn.commit_remote("other", "", {"type": "nobody-handles-this"})
    with pytest.raises(FailedPrecondition, match="nobody-handles-this"):
        sn.prepare("d", "other")
    assert "d" not in [i.name for i in sn.walk()]
    assert sn.stat("c").kind == KIND_ACTIVE


# ------------------------------------------------------------------ a full disk


class FullDisk:
    """The metadata connection of `sn` with its next `fails` COMMITs failing as SQLite
    fails them when the WAL cannot grow (the loop-mounted disk of tests/faults does it
    for real)."""

    def __init__(self, sn, fails: int) -> None:
        self.db, self.fails, self.sn = sn.ms._db, fails, sn
        sn.ms._db = self

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.fails > 0:
            self.fails -= 1
            self.db.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)

    def mend(self) -> None:
        self.sn.ms._db = self.db


def test_a_full_disk_is_resource_exhausted_naming_the_snapshot_and_changes_nothing(sn):
    sn.prepare("a", "")
    before = sn.walk()
    full = FullDisk(sn, fails=3)
    with pytest.raises(ResourceExhausted, match=r"^failed to commit snapshot a: disk full: "
                       r"cannot write snapshot metadata .*database or disk is full"):
        sn.commit("A", "a")
    with pytest.raises(ResourceExhausted, match="^failed to create snapshot b: disk full"):
        sn.prepare("b", "")
    with pytest.raises(ResourceExhausted, match="^failed to update snapshot a: disk full"):
        sn.update("a", {"x": "y"})
    assert full.fails == 0
    full.mend()
    assert sn.walk() == before
    assert os.listdir(sn.layout.staging) == []
    sn.cleanup()  # the directory of the create that did not commit, as after a crash
    assert os.listdir(sn.layout.snapshots) == ["1"]  # a's
    sn.commit("A", "a")  # the store is usable again once there is room
    assert sn.stat("A").kind == KIND_COMMITTED


def test_remove_on_a_full_disk_frees_the_files_first(sn):
    sn.prepare("base", "")
    sn.commit("BASE", "base")
    sn.prepare("a", "BASE")
    sid = _id_of(sn.mounts("a"))
    with open(os.path.join(sn.layout.fs(sid), "big"), "wb") as f:
        f.write(b"x" * 100_000)
    full = FullDisk(sn, fails=1)  # the metadata-first commit fails; after the files, room
    sn.remove("a")
    assert full.fails == 0
    assert [i.name for i in sn.walk()] == ["BASE"]
    assert not os.path.lexists(sn.layout.dir(sid))
    assert os.listdir(sn.layout.staging) == []
    # the checks still come first: a parent is refused, its files untouched
    sn.prepare("b", "BASE")
    FullDisk(sn, fails=1)
    with pytest.raises(FailedPrecondition, match="cannot remove snapshot with child"):
        sn.remove("BASE")
    assert os.path.isdir(sn.layout.fs(_id_of(sn.mounts("b"))))


@pytest.mark.parametrize("finish", ["restart", "cleanup", "remove"])
def test_a_removal_whose_files_went_but_whose_row_stayed_is_finished(sn, finish):
    """The disk too full even once the snapshot's files are gone: Remove says so, naming
    it; its tombstone in staging/ has start-up (or Cleanup) forget it, or the next Remove
    ends it: no snapshot without its directory is reported after a restart."""
    sn.prepare("base", "")
    sn.commit("BASE", "base")
    sn.prepare("a", "BASE")
    sid = _id_of(sn.mounts("a"))
    full = FullDisk(sn, fails=2)
    with pytest.raises(ResourceExhausted, match="^failed to remove snapshot a: disk full"):
        sn.remove("a")
    full.mend()
    assert not os.path.lexists(sn.layout.dir(sid))
    tombs = os.listdir(sn.layout.staging)
    assert len(tombs) == 1 and tombs[0].startswith(f"del-{sid}-")
    assert os.listdir(os.path.join(sn.layout.staging, tombs[0])) == []  # space freed
    if finish == "restart":
        home = sn.layout.home
        sn.close()
        again = OverlaySnapshotter(home, sync_commits=False)
        try:
            assert [i.name for i in again.walk()] == ["BASE"]
            assert os.listdir(again.layout.staging) == []
            assert again.prepare("after", "BASE")  # ids still line up
        finally:
            again.close()
        return
    if finish == "cleanup":
        sn.cleanup()
    else:
        sn.remove("a")
    assert [i.name for i in sn.walk()] == ["BASE"]
    assert os.listdir(sn.layout.staging) == []


# ------------------------------------------------------------------ crash points

CRASH = """
import os, sys
from cvmfs_graphdriver.snapshotter import metastore, overlay
home, point = sys.argv[1], sys.argv[2]
sn = overlay.OverlaySnapshotter(home, sync_commits=False)
sn.prepare("base", "")
sn.commit("BASE", "base")
sn.prepare("victim", "BASE")
real_fsync_dir = overlay.fsync_dir

def crash(*args):
    os._exit(9)  # as kill -9: no cleanup, no rollback, no atexit

if point == "create-before-rename":  # the staged dir is flushed just before its rename
    overlay.fsync_dir = crash
elif point == "create-after-rename":  # renamed into snapshots/, transaction not committed
    overlay.fsync_dir = lambda p: crash() if p == sn.layout.snapshots else real_fsync_dir(p)
elif point == "remove-before-commit":  # forgotten in the transaction, not committed
    real_remove = metastore.Transaction.remove

    def remove_then_crash(self, key):
        real_remove(self, key)
        crash()
    metastore.Transaction.remove = remove_then_crash
elif point == "remove-after-commit":  # metadata gone, the directory still in snapshots/
    sn._orphans_to_staging = crash
elif point == "remove-during-move":  # the directory moved aside, then the crash
    real_move = sn._orphans_to_staging
    sn._orphans_to_staging = lambda ids: (real_move(ids), crash())
elif point == "remove-after-move":  # metadata gone, directory moved to staging/
    sn._delete = crash
elif point.startswith("remove-full-"):  # the disk full: the metadata-first commit fails
    real_tx = metastore.MetaStore._tx
    commits = []

    def full_once(self, write):
        if not write or commits:
            return real_tx(self, write)
        commits.append(1)

        class Once:
            def __enter__(self_):
                self_.cm = real_tx(self, write)
                return self_.cm.__enter__()

            def __exit__(self_, *exc):
                if exc[0] is None:
                    self_.cm.__exit__(ValueError, ValueError(), None)
                    raise metastore.sqlite3.OperationalError("database or disk is full")
                return self_.cm.__exit__(*exc)
        return Once()
    metastore.MetaStore._tx = full_once
    if point == "remove-full-after-tombstone":  # files-first: moved aside, then the crash
        real_tomb = sn._to_tombstone
        sn._to_tombstone = lambda sid: (real_tomb(sid), crash())
    elif point == "remove-full-after-emptying":  # freed, the row not yet forgotten
        sn._empty = lambda path: (overlay.OverlaySnapshotter._empty(sn, path), crash())
    else:  # remove-full-after-commit: row forgotten, the tombstone still there
        sn._orphans_to_staging = crash
if point.startswith("create"):
    sn.prepare("new", "BASE")
else:
    sn.remove("victim")
sys.exit("no crash happened")
"""


@pytest.mark.parametrize("point, present", [
    ("create-before-rename", {"BASE", "victim"}),
    ("create-after-rename", {"BASE", "victim"}),
    ("remove-before-commit", {"BASE", "victim"}),
    ("remove-after-commit", {"BASE"}),
    ("remove-during-move", {"BASE"}),
    ("remove-after-move", {"BASE"}),
    ("remove-full-after-tombstone", {"BASE"}),
    ("remove-full-after-emptying", {"BASE"}),
    ("remove-full-after-commit", {"BASE"}),
])
def test_crash_at_each_step_leaves_whole_snapshots_only(tmp_path, point, present):
    need(os.geteuid() == 0, "needs root (chown)")
    home = str(tmp_path / "home")
    r = subprocess.run([sys.executable, "-c", CRASH, home, point], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    sn = OverlaySnapshotter(home, sync_commits=False)
    try:
        assert {i.name for i in sn.walk()} == present
        assert os.listdir(sn.layout.staging) == []  # emptied at start
        for name in present - {"BASE"}:
            assert os.path.isdir(sn.mounts(name)[0].options[-2].split("=", 1)[1])  # upperdir
        sn.cleanup()
        assert len(os.listdir(sn.layout.snapshots)) == len(present)
        m = sn.prepare("after", "BASE")  # ids and directories still line up
        assert m[0].type == "overlay" and os.listdir(sn.layout.fs(_id_of(m))) == []
    finally:
        sn.close()


def _id_of(mounts) -> str:
    upper = next(o for o in mounts[0].options if o.startswith("upperdir="))
    return os.path.basename(os.path.dirname(upper.split("=", 1)[1]))


def test_commit_hook_records_a_thin_layer_as_remote(sn, tmp_path):
    """The hook for thin images: at Commit, a hook that recognises the layer's files
    (thin.json) records the snapshot as remote; children mount the resolver's dirs instead
    of its fs/. A hook that refuses the layer refuses the commit and changes nothing."""
    layer = tmp_path / "layerfs"
    (layer / "bin").mkdir(parents=True)

    def hook(fs: str):
        path = os.path.join(fs, "thin.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            text = f.read()
        if "forbidden" in text:
            raise InvalidArgument("thin image layer cannot be used: repository not allowed")
        return {"type": "thin-test", "dir": text}

    sn.add_commit_hook(hook)
    sn.register_remote("thin-test", lambda layout, lower, has_parent: [lower.remote["dir"]])
    with mounted(sn.prepare("regular", ""), str(tmp_path / "m0")) as m, \
            open(f"{m}/file", "w") as f:
        f.write("x")
    sn.commit("R", "regular")  # no thin.json: a regular committed snapshot
    with mounted(sn.prepare("thin", "R"), str(tmp_path / "m1")) as m, \
            open(f"{m}/thin.json", "w") as f:
        f.write(str(layer))
    sn.commit("T", "thin")
    mounts = sn.prepare("child", "T")
    assert mounts[0].options[-1] == f"lowerdir={layer}:{sn.layout.fs('1')}"
    with mounted(sn.prepare("bad", "R"), str(tmp_path / "m2")) as m, \
            open(f"{m}/thin.json", "w") as f:
        f.write("forbidden")
    with pytest.raises(InvalidArgument, match="not allowed"):
        sn.commit("B", "bad")
    assert sn.stat("bad").kind == KIND_ACTIVE
    assert "B" not in [i.name for i in sn.walk()]


def test_prepare_hook_answers_already_exists_after_recording_a_remote_layer(sn, tmp_path):
    """The hook for lazy pulls: Prepare with a snapshot.ref label whose layer is
    available records it as a committed remote snapshot and answers AlreadyExists;
    containerd then finds it by label and parent."""
    layer = tmp_path / "layerfs"
    layer.mkdir()

    def hook(snapshotter, key, parent, labels):
        ref = labels.get("containerd.io/snapshot.ref")
        if ref:
            snapshotter.commit_remote(ref, parent, {"type": "lazy-test", "dir": str(layer)},
                                      labels={"containerd.io/snapshot.ref": ref})
            raise AlreadyExists(f"target snapshot {ref!r}")

    sn.add_prepare_hook(hook)
    sn.register_remote("lazy-test", lambda layout, lower, has_parent: [lower.remote["dir"]])
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/1/extract-1 sha256:c1", "",
                   {"containerd.io/snapshot.ref": "sha256:c1"})
    assert [i.name for i in sn.walk(
        ['labels."containerd.io/snapshot.ref"==sha256:c1,parent==""'])] == ["sha256:c1"]
    assert "ns/1/extract-1 sha256:c1" not in [i.name for i in sn.walk()]
    # a view of a remote parent that expands to one directory is a read-only bind of it
    assert sn.view("v", "sha256:c1") == [Mount("bind", str(layer), ("ro", "rbind"))]
    # and a remote snapshot is refused where any committed one is
    with pytest.raises(FailedPrecondition, match="not active"):
        sn.commit("again", "sha256:c1")
    with pytest.raises(FailedPrecondition, match="not active or view"):
        sn.mounts("sha256:c1")
    assert sn.usage("sha256:c1") == Usage()
    with pytest.raises(FailedPrecondition, match="child"):
        sn.remove("sha256:c1")
    sn.remove("v")
    sn.remove("sha256:c1")
    assert [i.name for i in sn.walk()] == []
    assert os.listdir(sn.layout.snapshots) == []
