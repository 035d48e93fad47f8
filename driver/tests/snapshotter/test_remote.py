"""Remote snapshots from CVMFS in the snapshotter (issue 8): lazy pulls of layers
published in DUCC's layout, thin images, and what a container then sees, through real
overlay mounts. The repository is the session's `cvmfs` fixture (harness.CvmfsRepos): a
real CernVM-FS stratum 0 on this machine, read through a real client mount, where
scripts/cvmfs.sh installed it; its layers are published as DUCC publishes them
(`cvmfs_server ingest`, which keeps whiteouts as plain `.wh.*` files).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, NamedTuple, Optional

import pytest
from sntools import mounted, need

from cvmfs_graphdriver import thin
from cvmfs_graphdriver.snapshotter import remote
from cvmfs_graphdriver.snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
)
from cvmfs_graphdriver.snapshotter.metastore import KIND_ACTIVE, KIND_COMMITTED
from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

REPO = "test.repo"  # allowed to the snapshotter
OTHER_REPO = "ducc.repo"  # published too, but not allowed
REF = remote.TARGET_REF_LABEL
DIGEST = remote.LAYER_DIGEST_LABEL


def hexof(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def chain(name: str) -> str:
    return "sha256:" + hexof("chain " + name)


def diff_of(name: str) -> str:
    """The uncompressed digest recorded for published layer `name` (made up)."""
    return "sha256:" + hexof("diff " + name)


class Pulled(NamedTuple):
    name: str  # the snapshot's name, what containerd then passes as the next parent
    ref: str  # its chain ID


class Repo:
    """The test's layers in a repository of the `cvmfs` fixture, at
    <root>/<repo>/.layers/<xx>/<hex>/layerfs. `layer()` stages a layer; `publish()`
    ingests everything staged in one transaction (a publish costs a second or so) and
    makes the client see it. A layer's digest is made from the test's name and the
    layer's, so that a rerun republishes the same paths instead of adding new ones."""

    def __init__(self, cvmfs, test: str) -> None:
        self.cvmfs = cvmfs
        self.root = cvmfs.root
        self.test = test
        self.staged: Dict[str, tempfile.TemporaryDirectory] = {}

    def digest(self, name: str) -> str:
        return hexof(f"{self.test} {name}")

    def path(self, h: str, repo: str = REPO) -> str:
        """Where the driver reads layer `h`: its layerfs under the client mount."""
        return os.path.join(self.root, repo, thin.layer_path(h))

    def layer(self, name: str, files: dict, recorded: bool = True, repo: str = REPO,
              layerfs_link: Optional[str] = None) -> str:
        """Stage `files` ({path: content, path ending in / = dir}) as a layer with, if
        `recorded`, its diff ID in .metadata/origin.json (as cvmfs-thin does); return its
        hex. `layerfs_link`: the layerfs is a symbolic link to there instead."""
        h = self.digest(name)
        stage = self.staged.setdefault(repo, tempfile.TemporaryDirectory(prefix="remote-"))
        top = os.path.join(stage.name, os.path.dirname(thin.layer_path(h)))
        fs = os.path.join(top, "layerfs")
        if layerfs_link is not None:
            os.makedirs(top)
            os.symlink(layerfs_link, fs)
        else:
            os.makedirs(fs)
        if recorded:
            meta = os.path.join(top, thin.METADATA_DIR)
            os.makedirs(meta)
            with open(os.path.join(meta, thin.ORIGIN_FILE), "w") as f:
                json.dump({"origin": "test", "diff_id": diff_of(name)}, f)
        for path, content in files.items():
            full = os.path.join(fs, path)
            if path.endswith("/"):
                os.makedirs(full, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(content)
        return h

    def publish(self) -> None:
        for repo, stage in self.staged.items():
            self.cvmfs.put_tree(repo, thin.LAYERS_DIR, os.path.join(stage.name,
                                                                     thin.LAYERS_DIR))
            stage.cleanup()
        self.staged.clear()

    def unpublish(self, h: str) -> None:
        self.cvmfs.delete(REPO, os.path.dirname(thin.layer_path(h)))


@pytest.fixture
def env(cvmfs, tmp_path, request):
    need(os.geteuid() == 0, "needs root (overlay mounts)")
    repo = Repo(cvmfs, request.node.name)
    sn = OverlaySnapshotter(str(tmp_path / "home"), sync_commits=False)
    remote.install(sn, repo.root, [REPO])
    yield sn, repo, tmp_path
    sn.close()


def lazy(sn, name: str, h: str, parent: Optional[Pulled] = None) -> Pulled:
    """Prepare as containerd's unpacker does for a pull with the CRI labels (the chain ID
    of the layer on its parent), then find the snapshot as it does (List by label and
    parent)."""
    ref = thin.chain_id(parent.ref if parent else None, diff_of(name))
    bparent = parent.name if parent else ""
    with pytest.raises(AlreadyExists):
        sn.prepare(f"default/1/extract-{name} {ref}", bparent,
                   {REF: ref, DIGEST: f"sha256:{h}",
                    "containerd.io/snapshot/cri.image-ref": "example.org/app:1"})
    found = sn.walk([f'labels."{REF}"=={ref},parent=="{bparent}"'])
    assert [i.kind for i in found] == [KIND_COMMITTED], found
    return Pulled(found[0].name, ref)


def listing(root: str) -> list:
    out = []
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
    return sorted(out)


def test_a_published_layer_is_committed_remote_and_found_as_containerd_looks(env):
    sn, repo, tmp = env
    h = repo.layer("base", {"bin/sh": "shell", "etc/passwd": "root"})
    repo.publish()
    pulled = lazy(sn, "base", h)
    ref = pulled.ref
    assert ref == diff_of("base")  # a bottom layer's chain ID is its diff ID
    found = sn.walk([f'labels."{REF}"=={ref},parent==""'])
    assert [(i.name, i.kind, i.parent) for i in found] == [(ref, KIND_COMMITTED, "")]
    # the prepared key itself was never created
    assert [i.name for i in sn.walk()] == [ref]
    with mounted(sn.prepare("container", pulled.name), str(tmp / "m")) as m:
        assert listing(m) == ["bin", "bin/sh", "etc", "etc/passwd"]
        with open(f"{m}/etc/passwd") as f:
            assert f.read() == "root"
        with open(f"{m}/new", "w") as f:
            f.write("written in the container")
    assert sorted(os.listdir(repo.path(h))) == ["bin", "etc"]  # the repository is never written
    # pulling again: the same answer, nothing new
    lazy(sn, "base", h)
    assert sorted(i.name for i in sn.walk()) == ["container", ref]


def test_whiteouts_in_published_layers_are_honoured_and_hidden(env):
    """cvmfs_server ingest keeps .wh.* as plain files; the container must see the upper
    layer's deletions and opaque directories, and no marker, and no CVMFS bookkeeping."""
    sn, repo, tmp = env
    base = repo.layer("l1", {"etc/motd": "hi", "etc/keep": "k", "data/old/f1": "1",
                             "gone-dir/x": "x", ".cvmfscatalog": ""})
    # .cvmfscatalog: what `cvmfs_server ingest --catalog` leaves (at the root, nested)
    top = repo.layer("l2", {"etc/.wh.motd": "", ".wh.gone-dir": "", "data/old/.wh..wh..opq": "",
                            "data/old/f2": "2", "added": "a", ".cvmfscatalog": "",
                            "data/.cvmfscatalog": ""})
    repo.publish()
    r1 = lazy(sn, "l1", base)
    r2 = lazy(sn, "l2", top, parent=r1)
    with mounted(sn.prepare("c", r2.name), str(tmp / "m")) as m:
        assert listing(m) == ["added", "data", "data/old", "data/old/f2", "etc", "etc/keep"]
    # a view of the same (read-only) agrees
    with mounted(sn.view("v", r2.name), str(tmp / "v")) as m:
        assert listing(m) == ["added", "data", "data/old", "data/old/f2", "etc", "etc/keep"]


def test_a_regular_layer_on_a_remote_one_and_the_reverse(env):
    sn, repo, tmp = env
    base = repo.layer("b", {"a": "from cvmfs", "b": "from cvmfs"})
    top = repo.layer("t", {"d": "from cvmfs", ".wh.b": ""})
    repo.publish()
    r1 = lazy(sn, "b", base)
    # containerd downloads the next layer (not published) and applies it itself
    missing = hexof("not published")
    mounts = sn.prepare("extract-2", r1.name, {REF: chain("2"), DIGEST: f"sha256:{missing}"})
    with mounted(mounts, str(tmp / "m")) as m:
        os.remove(f"{m}/a")
        with open(f"{m}/c", "w") as f:
            f.write("downloaded")
    regular = Pulled(f"default/7/{chain('2')}", chain("2"))  # as containerd names it
    sn.commit(regular.name, "extract-2")
    # a published layer above a downloaded one is remote again
    r3 = lazy(sn, "t", top, parent=regular)
    with mounted(sn.prepare("c", r3.name), str(tmp / "c")) as m:
        assert listing(m) == ["c", "d"]


def test_digest_of_the_wrong_form_is_refused_and_nothing_changes(env):
    sn, _, _ = env
    for bad in ("sha512:" + "a" * 128, "sha256:ABC", "sha256:" + "a" * 63, "a" * 64):
        with pytest.raises(InvalidArgument, match="not a layer digest"):
            sn.prepare("k", "", {REF: chain("x"), DIGEST: bad})
    assert sn.walk() == []


def test_without_repositories_or_labels_prepare_is_ordinary(cvmfs, tmp_path, request):
    need(os.geteuid() == 0, "needs root")
    repo = Repo(cvmfs, request.node.name)
    h = repo.layer("base", {"f": "x"})
    repo.publish()
    sn = OverlaySnapshotter(str(tmp_path / "home"), sync_commits=False)
    remote.install(sn, repo.root, [])  # nothing allowed
    try:
        sn.prepare("k", "", {REF: chain("x"), DIGEST: f"sha256:{h}"})
        assert sn.stat("k").kind == KIND_ACTIVE
    finally:
        sn.close()


def test_a_layer_in_a_repository_not_allowed_is_downloaded(env):
    sn, repo, _ = env
    h = repo.layer("o", {"f": "x"}, repo=OTHER_REPO)
    repo.publish()
    assert os.path.isdir(repo.path(h, OTHER_REPO))
    sn.prepare("k", "", {REF: diff_of("o"), DIGEST: f"sha256:{h}"})
    assert sn.stat("k").kind == KIND_ACTIVE


def test_a_layerfs_that_escapes_its_repository_is_not_used(env):
    sn, repo, tmp = env
    outside = tmp / "outside"  # a directory of the host, outside every repository
    outside.mkdir()
    h = repo.layer("escape", {}, layerfs_link=str(outside))
    repo.publish()
    assert os.path.islink(repo.path(h)) and os.path.isdir(repo.path(h))
    sn.prepare("k", "", {REF: diff_of("escape"), DIGEST: f"sha256:{h}"})
    assert sn.stat("k").kind == KIND_ACTIVE  # containerd downloads it instead


def thin_layer(sn, tmp, key: str, descriptor: dict, parent: str = "") -> None:
    with mounted(sn.prepare(key, parent), str(tmp / f"w-{key}")) as m, \
            open(f"{m}/thin.json", "w") as f:
        json.dump(descriptor, f)


def test_a_thin_image_layer_is_mounted_as_its_cvmfs_layers(env):
    sn, repo, tmp = env
    l1 = repo.layer("t1", {"bin/sh": "shell", "etc/motd": "hi"})
    l2 = repo.layer("t2", {"etc/.wh.motd": "", "app/run": "run"})
    repo.publish()
    desc = {"version": "1.0", "layers": [
        {"digest": l1, "url": f"cvmfs://{REPO}/{thin.layer_path(l1)}"},
        {"digest": l2, "url": f"cvmfs://{REPO}/{thin.layer_path(l2)}"}]}
    thin_layer(sn, tmp, "extract-thin", desc)
    sn.commit("sha256:thin", "extract-thin")
    with mounted(sn.prepare("c", "sha256:thin"), str(tmp / "m")) as m:
        assert listing(m) == ["app", "app/run", "bin", "bin/sh", "etc"]  # no thin.json


@pytest.mark.parametrize("url,why", [
    ("cvmfs://evil.example.org/.layers/x", "not allowed"),
    (f"cvmfs://{REPO}/../../etc", "climbs out"),
])
def test_a_thin_layer_naming_what_is_not_allowed_is_refused_and_stays_active(env, url, why):
    sn, _, tmp = env
    thin_layer(sn, tmp, "bad", {"version": "1.0", "layers": [{"url": url}]})
    with pytest.raises(InvalidArgument, match=why):
        sn.commit("sha256:bad", "bad")
    assert sn.stat("bad").kind == KIND_ACTIVE
    assert "sha256:bad" not in [i.name for i in sn.walk()]


def test_a_layer_gone_from_the_repository_fails_the_mount_clearly(env):
    sn, repo, _ = env
    h = repo.layer("vanishing", {"f": "x"})
    repo.publish()
    ref = lazy(sn, "vanishing", h).name
    repo.unpublish(h)  # a new revision of the repository without it
    with pytest.raises(FailedPrecondition, match="is missing"):
        sn.prepare("c", ref)
    assert "c" not in [i.name for i in sn.walk()]
    assert repo.layer("vanishing", {"f": "x"}) == h
    repo.publish()
    sn.prepare("c", ref)


def test_a_deep_stack_mounts_though_its_paths_exceed_a_page(env):
    """40 published layers, each with markers (so masks sit between them): their CVMFS
    paths alone are far over one page of mount options. containerd then gives overlay
    the lowerdirs relative to their common directory (compact_lowerdir, as its
    mount_linux.go); the snapshotter's short links in <home>/l make that possible."""
    sn, repo, tmp = env
    layers = []
    for i in range(40):
        files = {f"f{i:02}": str(i), f".wh.f{i - 1:02}" if i else "base": ""}
        layers.append(repo.layer(f"deep{i}", files))
    repo.publish()
    pulled: Optional[Pulled] = None
    for i, h in enumerate(layers):
        pulled = lazy(sn, f"deep{i}", h, parent=pulled)
    assert pulled is not None
    mounts = sn.prepare("c", pulled.name)
    lowerdir = next(o for o in mounts[0].options if o.startswith("lowerdir="))
    assert len(lowerdir.split(":")) >= 79  # 40 layers and the masks between
    real = sum(len(os.path.realpath(d)) + 1 for d in lowerdir[len("lowerdir="):].split(":"))
    assert real > 4096  # what overlay would get without the links
    with mounted(mounts, str(tmp / "m")) as m:
        assert listing(m) == ["base", "f39"]  # each layer deleted the one below's file


def test_a_published_layer_is_not_served_for_another_chain(env):
    """An image can pair any published digest with any diff IDs in its config: the chain
    ID containerd asks for must follow from the layer's recorded diff ID, or containerd
    downloads (and itself checks) the layer. Otherwise every image with that chain would
    get the published layer."""
    sn, repo, _ = env
    h = repo.layer("real", {"f": "x"})
    b = repo.layer("base", {"b": ""})
    top = repo.layer("top", {"t": ""})
    repo.publish()
    victim = thin.chain_id(None, diff_of("another layer"))
    sn.prepare("k", "", {REF: victim, DIGEST: f"sha256:{h}"})
    assert sn.stat("k").kind == KIND_ACTIVE  # prepared as usual: containerd downloads
    assert victim not in [i.name for i in sn.walk()]
    # on a parent, the chain must be the parent's chain and the layer's diff ID
    base = lazy(sn, "base", b)
    wrong = thin.chain_id(chain("some other parent"), diff_of("top"))
    sn.prepare("k2", base.name, {REF: wrong, DIGEST: f"sha256:{top}"})
    assert sn.stat("k2").kind == KIND_ACTIVE
    lazy(sn, "top", top, parent=base)  # the right chain is served


def test_a_layer_without_a_recorded_diff_id_is_downloaded_unless_trusted(env, tmp_path):
    sn, repo, _ = env
    h = repo.layer("ducc", {"f": "x"}, recorded=False)  # as DUCC publishes
    repo.publish()
    sn.prepare("k", "", {REF: diff_of("ducc"), DIGEST: f"sha256:{h}"})
    assert sn.stat("k").kind == KIND_ACTIVE
    trusting = OverlaySnapshotter(str(tmp_path / "home2"), sync_commits=False)
    try:
        remote.install(trusting, repo.root, [REPO], trust_unrecorded=True)
        lazy(trusting, "ducc", h)
    finally:
        trusting.close()


def test_the_same_chain_on_another_parent_gets_its_own_snapshot(env):
    """Two namespaces pull the same image; its bottom layer was downloaded in each (two
    parents with one chain ID): each gets its own remote snapshot on its own parent."""
    sn, repo, tmp = env
    top = repo.layer("top", {"t": "cvmfs"})
    repo.publish()
    parents = []
    for ns in ("ns1", "ns2"):
        with mounted(sn.prepare(f"{ns}/extract", ""), str(tmp / ns)) as m, \
                open(f"{m}/b", "w") as f:
            f.write(ns)
        parents.append(Pulled(f"{ns}/3/{chain('bottom')}", chain("bottom")))
        sn.commit(parents[-1].name, f"{ns}/extract")
    pulled = [lazy(sn, "top", top, parent=p) for p in parents]
    assert pulled[0].ref == pulled[1].ref and pulled[0].name != pulled[1].name
    for p, ns in zip(pulled, ("ns1", "ns2")):
        with mounted(sn.view(f"v-{ns}", p.name), str(tmp / f"v-{ns}")) as m:
            assert listing(m) == ["b", "t"]
            with open(f"{m}/b") as f:
                assert f.read() == ns


def test_an_image_holding_one_layer_twice_mounts(env):
    """Images converted from old schemas repeat a layer (the empty one): the same
    published directory twice in one lowerdir would be refused by overlayfs (ELOOP)."""
    sn, repo, tmp = env
    twice = repo.layer("twice", {"t": "same"})
    mid = repo.layer("middle", {"m": "m"})
    repo.publish()
    first = lazy(sn, "twice", twice)
    middle = lazy(sn, "middle", mid, parent=first)
    ref = thin.chain_id(middle.ref, diff_of("twice"))
    with pytest.raises(AlreadyExists):
        sn.prepare("again", middle.name, {REF: ref, DIGEST: f"sha256:{twice}"})
    top = sn.walk([f'labels."{REF}"=={ref}'])[0].name
    lowerdir = next(o for o in sn.prepare("c", top)[0].options if o.startswith("lowerdir="))
    dirs = lowerdir[len("lowerdir="):].split(":")
    assert len(dirs) == len(set(dirs))
    with mounted(sn.prepare("c2", top), str(tmp / "m")) as m:
        assert listing(m) == ["m", "t"]


def test_a_repository_that_does_not_answer_does_not_stall_pulls(env, monkeypatch):
    """Every pull asks whether its layers are published: a hung CVMFS mount must not hold
    Prepare; containerd downloads the layer instead."""
    import threading
    import time

    sn, repo, _ = env
    h = repo.layer("hung", {"f": "x"})
    repo.publish()
    release = threading.Event()
    real = thin.resolve_layer_dir

    def hung(root, layer):
        release.wait(30)  # as a stat in a mount whose servers do not answer
        return real(root, layer)

    monkeypatch.setattr(thin, "resolve_layer_dir", hung)
    monkeypatch.setattr(remote, "LOOKUP_SECONDS", 0.5)
    try:
        started = time.monotonic()
        sn.prepare("k", "", {REF: diff_of("hung"), DIGEST: f"sha256:{h}"})
        assert time.monotonic() - started < 5
        assert sn.stat("k").kind == KIND_ACTIVE  # prepared: containerd downloads it
    finally:
        release.set()
