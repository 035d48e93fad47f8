"""`status` of a snapshotter home: the real metadata store (SQLite) holding a downloaded
layer, a thin image's layer, a lazily pulled one and a container's active snapshot, laid
out as the snapshotter lays them out; status reads it without writing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import pytest

from cvmfs_graphdriver import cli, fdtree, status, thin
from cvmfs_graphdriver.snapshotter.layout import SnapshotterLayout
from cvmfs_graphdriver.snapshotter.metastore import KIND_ACTIVE, MetaStore, Usage
from cvmfs_graphdriver.snapshotter.remote import LAYER_DIGEST_LABEL, TARGET_REF_LABEL


def record(repo: str, *names: str) -> dict:
    hexes = [hashlib.sha256(n.encode()).hexdigest() for n in names]
    return {"type": "cvmfs", "layers": [{"repo": repo, "path": thin.layer_path(h),
                                         "digest": h} for h in hexes]}


@pytest.fixture
def home(tmp_path) -> str:
    layout = SnapshotterLayout(str(tmp_path / "home"))
    for d in (layout.snapshots, layout.staging):
        os.makedirs(d)
    ms = MetaStore(layout.metadata_db)
    try:
        with ms.transaction(write=True) as tx:
            base = tx.create_snapshot(KIND_ACTIVE, "extract-base", "")
            os.makedirs(layout.fs(base.id))
            with open(os.path.join(layout.fs(base.id), "f"), "wb") as f:
                f.write(b"x" * 50_000)
            tx.commit_active("extract-base", "sha256:base", Usage(50_000, 1))
            # a thin image's layer: downloaded (thin.json in its fs/), recorded remote
            t = tx.create_snapshot(KIND_ACTIVE, "extract-thin", "sha256:base")
            os.makedirs(layout.fs(t.id))
            with open(os.path.join(layout.fs(t.id), thin.DESCRIPTOR_NAME), "w") as f:
                f.write("{}")
            tx.commit_active("extract-thin", "sha256:thin", Usage(2, 1),
                             remote=record("a.repo", "t1", "t2"))
            # lazily pulled: no files of its own
            for name, repo in (("sha256:lazy1", "a.repo"), ("sha256:lazy2", "b.repo")):
                sid = tx.create_committed(name, "sha256:base", record(repo, name), labels={
                    TARGET_REF_LABEL: name,
                    LAYER_DIGEST_LABEL: "sha256:" + hashlib.sha256(name.encode()).hexdigest()})
                os.makedirs(layout.dir(sid))
            c = tx.create_snapshot(KIND_ACTIVE, "container", "sha256:lazy1")
            os.makedirs(layout.fs(c.id))
    finally:
        ms.close()
    return layout.home


def test_snapshotter_status_counts_each_kind(home, capsys):
    db = SnapshotterLayout(home).metadata_db
    before = os.stat(db).st_mtime_ns
    st = status.snapshotter_status(home)
    assert (st.regular, st.thin, st.lazy, st.incomplete) == (1, 1, 2, 0)
    assert st.active_mounts == ["container"]
    assert st.repositories == {"a.repo": {"thin": 1, "lazy": 1},
                               "b.repo": {"thin": 0, "lazy": 1}}
    assert len([r for r in st.refs if r.layer == "sha256:thin"]) == 2
    assert st.disk.used_bytes >= 50_000
    assert os.stat(db).st_mtime_ns == before  # read only
    assert re.search(r"^  lazily pulled +2$", status.render(st), re.MULTILINE)
    assert cli.main(["status", "--json", "--mode", "snapshotter", "--home", home]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mode"] == "snapshotter"
    assert doc["layers"] == {"total": 4, "regular": 1, "thin": 1, "lazy": 2, "incomplete": 0}
    assert doc["mounts"] == {"active": 1, "mount_points": ["container"]}


def test_status_measures_a_container_tree_deeper_than_python_recursion(home, capsys):
    """A container's `mkdir -p` of 1100 levels in its upper directory (past Python's
    recursion limit, where os.walk raised RecursionError): status measures it, each
    inode once, without following a symlink out of the home."""
    layout = SnapshotterLayout(home)
    upper = layout.fs(max(os.listdir(layout.snapshots), key=int))  # the container's
    before = status.snapshotter_status(home).disk.used_bytes
    outside = os.path.join(os.path.dirname(home), "outside")
    with open(outside, "wb") as f:
        f.write(os.urandom(1 << 20))
    fd = os.open(upper, fdtree.DIR_FLAGS)
    try:
        for _ in range(1100):  # one level at a time (os.makedirs recurses)
            os.mkdir("d", dir_fd=fd)
            down = os.open("d", fdtree.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = down
        with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(os.urandom(200_000))
        os.link("bottom", "again", src_dir_fd=fd, dst_dir_fd=fd)  # counted once
        os.symlink(outside, "out", dir_fd=fd)  # not followed
        added = os.stat("bottom", dir_fd=fd).st_blocks * 512
        # the link's own blocks: none when its target fits in the inode (ext4: < 60
        # bytes), one when the temporary directory's path is longer
        added += os.stat("out", dir_fd=fd, follow_symlinks=False).st_blocks * 512
        os.close(fd)
        fd = os.open(upper, fdtree.DIR_FLAGS)
        for _ in range(1100):  # what the 1100 directories take
            down = os.open("d", fdtree.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = down
            added += os.fstat(fd).st_blocks * 512
        assert sys.getrecursionlimit() < 1100 and added >= 200_000
        assert cli.main(["status", "--json", "--mode", "snapshotter", "--home", home]) == 0
        used = json.loads(capsys.readouterr().out)["disk"]["used_bytes"]
        assert used == before + added, (before, added, used)
    finally:  # pytest's own clean-up of its temporary directories recurses
        os.close(fd)
        fdtree.remove_tree(os.path.join(upper, "d"))


def test_snapshotter_status_of_a_home_never_used(tmp_path):
    os.makedirs(tmp_path / "home")
    st = status.snapshotter_status(str(tmp_path / "home"))
    assert st.total == 0 and "nothing was pulled" in st.notes[0]
    assert not os.path.exists(SnapshotterLayout(str(tmp_path / "home")).metadata_db)


def test_snapshotter_status_without_a_home_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(status.StatusError, match="systemctl start"):
        status.snapshotter_status(str(tmp_path / "none"))
    assert cli.main(["status", "--mode", "snapshotter", "--home", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_record_naming_a_path_outside_its_repository_is_not_followed(tmp_path):
    """A remote record is checked as a descriptor is: `check` lists the layers status
    names, so none may lead out of its repository."""
    layout = SnapshotterLayout(str(tmp_path / "home"))
    os.makedirs(layout.snapshots)
    ms = MetaStore(layout.metadata_db)
    try:
        with ms.transaction(write=True) as tx:
            sid = tx.create_committed("sha256:evil", "", {"type": "cvmfs", "layers": [
                {"repo": "a.repo", "path": "../../etc", "digest": ""},
                {"repo": "../x", "path": "layers/y", "digest": ""},
                {"repo": "a.repo", "path": "ok/layer", "digest": ""}]})
            os.makedirs(layout.dir(sid))
    finally:
        ms.close()
    st = status.snapshotter_status(layout.home)
    assert [(r.repo, r.path) for r in st.refs] == [("a.repo", "ok/layer")]
    assert len(st.notes) == 2 and "climbs out" in st.notes[0]
    assert "invalid repository name" in st.notes[1]
