"""`status` and the store-side checks of `check` on a real driver home: real layers
(regular, thin, a container's read-write layer mounted through overlay), real overlay
mounts, and a home on overlayfs that must be refused. The CVMFS root is a plain
directory tree, as in the thin unit tests."""

from __future__ import annotations

import json
import os

import pytest
from layer_tools import TarBuilder, make_layer, mounts_below

from cvmfs_graphdriver import check, mounts, status, thin
from cvmfs_graphdriver.check import FAIL, OK, Node, Report
from cvmfs_graphdriver.config import Config

pytestmark = pytest.mark.root

REPO = "test.repo"
HEXES = ["1" * 64, "2" * 64]


def thin_tar(*hexes: str) -> bytes:
    desc = {"version": "1.0", "layers": [
        {"digest": f"sha256:{h}", "url": f"cvmfs://{REPO}/{thin.layer_path(h)}"}
        for h in hexes]}
    return TarBuilder().file(thin.DESCRIPTOR_NAME, json.dumps(desc).encode()).bytes()


@pytest.fixture
def cvmfs_root(tmp_path) -> str:
    root = tmp_path / "cvmfs"
    for h in HEXES:
        layer = root / REPO / thin.layer_path(h)
        (layer / "etc").mkdir(parents=True)
        (layer / "etc" / f"from-{h[0]}").write_text("published\n")
    return str(root)


def test_status_counts_regular_thin_and_mounted_layers(new_driver, cvmfs_root, tmp_path,
                                                       capsys):
    drv = new_driver(cvmfs_root=cvmfs_root, repositories=(REPO,))
    base = make_layer(drv, data=TarBuilder().file("etc/hostname", b"x" * 100_000).bytes())
    make_layer(drv, parent=base, data=TarBuilder().file("etc/motd", b"hi\n").bytes())
    thin_id = make_layer(drv, data=thin_tar(*HEXES))
    second_thin = make_layer(drv, data=thin_tar(HEXES[0]))
    container = make_layer(drv, parent=thin_id, rw=True)
    idle = make_layer(drv, parent=base, rw=True)
    view = drv.get(container)
    try:
        assert sorted(os.listdir(os.path.join(view, "etc"))) == ["from-1", "from-2"]
        st = status.plugin_status(drv.layout.home)
        # base, its child and the two read-write layers are regular; two are thin
        assert (st.regular, st.thin, st.lazy, st.incomplete) == (4, 2, 0, 0)
        assert st.total == 6
        assert st.repositories == {REPO: {"thin": 2, "lazy": 0}}
        assert st.active_mounts == [drv.layout.merged(container)]
        assert idle not in "".join(st.active_mounts)
        assert {(r.layer, r.path) for r in st.refs} == {
            (thin_id, thin.layer_path(HEXES[0])), (thin_id, thin.layer_path(HEXES[1])),
            (second_thin, thin.layer_path(HEXES[0]))}
        assert st.disk.used_bytes >= 100_000  # the base layer's file
        assert st.disk.free_bytes > 0 and st.disk.filesystem
        doc = json.loads(status.dumps(st))
        assert doc["layers"] == {"total": 6, "regular": 4, "thin": 2, "lazy": 0,
                                 "incomplete": 0}
        assert doc["repositories"] == {REPO: {"thin": 2, "lazy": 0}}
        assert doc["mounts"]["active"] == 1
        assert doc["disk"]["used_bytes"] == st.disk.used_bytes
        table = status.render(st)
        assert "  thin" in table and REPO in table
    finally:
        drv.put(container)
    assert status.plugin_status(drv.layout.home).active_mounts == []
    # the command, with the home given
    from cvmfs_graphdriver import cli

    assert cli.main(["status", "--json", "--mode", "plugin", "--home",
                     drv.layout.home]) == 0
    assert json.loads(capsys.readouterr().out)["layers"]["thin"] == 2


def test_an_interrupted_apply_is_counted_incomplete(new_driver):
    drv = new_driver()
    layer = make_layer(drv, data=TarBuilder().file("a", b"a").bytes())
    with open(drv.layout.applying_marker(layer), "w"):
        pass
    st = status.plugin_status(drv.layout.home)
    assert (st.regular, st.incomplete) == (0, 1)


def test_overlay_check_on_a_real_home(drv):
    report = Report("plugin")
    check.check_overlay(Node(), drv.layout.home, "plugin", report)
    (r,) = report.results
    assert r.status == OK, r
    assert "d_type, an overlay mounts" in r.detail
    assert mounts_below(drv.layout.home) == []
    assert not [n for n in os.listdir(drv.layout.home) if n.startswith(".check-")]


def test_overlay_check_refuses_a_home_on_overlayfs(as_root, tmp_path):
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    merged = str(tmp_path / "merged")
    mounts.mount_overlay(f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
                         f"workdir={tmp_path}/work", merged)
    try:
        report = Report("plugin")
        check.check_overlay(Node(), merged, "plugin", report)
        (r,) = report.results
        assert r.status == FAIL and "is on overlayfs" in r.detail
        assert "ext4, xfs or a volume" in r.fix
    finally:
        mounts.unmount(merged)


def test_check_reads_the_layers_the_node_uses(new_driver, cvmfs_root, tmp_path):
    """check's repository check follows the home's thin layers: one published layer
    removed from the repository fails it, naming the layer."""
    drv = new_driver(cvmfs_root=cvmfs_root, repositories=(REPO,))
    make_layer(drv, data=thin_tar(*HEXES))
    cfg = Config(cvmfs_root=cvmfs_root, repositories=(REPO,))
    store = status.plugin_status(drv.layout.home)
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), cfg, store, report)
    assert [r.status for r in report.results] == [OK]
    gone = os.path.join(cvmfs_root, REPO, thin.layer_path(HEXES[1]))
    os.rename(gone, gone + ".moved")
    report = Report("plugin")
    check.check_repositories(Node(timeout=5), cfg, store, report)
    (r,) = report.results
    assert r.status == FAIL and HEXES[1] in r.detail and HEXES[0] not in r.detail
