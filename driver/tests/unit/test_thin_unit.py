"""Thin descriptors, whiteout masks and layer paths (issue 3), without root or dockerd.

`parse_descriptor` must accept the descriptor forms found in the wild and refuse every
descriptor a node must not use with a message that names the problem; `plan_masks`
decides what the local mask directories between CVMFS layers hold and `stack_order` how
they stack; markers found from tar names (publisher side) must equal those found by
scanning a published tree (driver side);
`resolve_layer_dir` must never leave `<cvmfs root>/<repo>`, even through symlinks.
The "repository" here is a plain temporary directory tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading

import pytest
from harness import need

from cvmfs_graphdriver import thin
from cvmfs_graphdriver.archive import split_member_name
from cvmfs_graphdriver.errors import DriverError
from cvmfs_graphdriver.publish.stores import layer_dir
from cvmfs_graphdriver.whiteouts import LayerMarkers

ALLOWED = ("test.repo", "ducc.repo")
HEX = hashlib.sha256(b"unit-layer").hexdigest()
HEX2 = hashlib.sha256(b"unit-layer-2").hexdigest()


def doc(*layers: dict, version: str = "1.0", **extra) -> bytes:
    return json.dumps({"version": version, "layers": list(layers), **extra}).encode()


def url_layer(path: str, repo: str = "test.repo", digest: str = HEX) -> dict:
    return {"digest": digest, "url": f"cvmfs://{repo}/{path}"}


def refused(data: bytes, allowed=ALLOWED) -> str:
    with pytest.raises(thin.DescriptorError) as e:
        thin.parse_descriptor(data, allowed)
    return str(e.value)


# ---------------------------------------------------------------------------- accepted


def test_url_form_of_the_original_driver_and_ducc():
    d = thin.parse_descriptor(
        doc(url_layer(f".layers/{HEX[:2]}/{HEX}/layerfs"),
            url_layer(f".layers/{HEX2[:2]}/{HEX2}/layerfs", repo="ducc.repo", digest=HEX2),
            origin="library/x:1@https://registry-1.docker.io/v2", comment="c"),
        ALLOWED)
    assert d.version == "1.0"
    assert d.origin == "library/x:1@https://registry-1.docker.io/v2"
    assert [(la.repo, la.path, la.digest) for la in d.layers] == [
        ("test.repo", f".layers/{HEX[:2]}/{HEX}/layerfs", HEX),
        ("ducc.repo", f".layers/{HEX2[:2]}/{HEX2}/layerfs", HEX2),
    ]
    assert d.repositories == ["ducc.repo", "test.repo"]
    assert d.layers[0].url == f"cvmfs://test.repo/.layers/{HEX[:2]}/{HEX}/layerfs"


def test_older_layers_hex_url_and_digest_prefix():
    d = thin.parse_descriptor(doc({"digest": f"sha256:{HEX}",
                                   "url": f"cvmfs://test.repo/layers/{HEX}"}), ALLOWED)
    assert (d.layers[0].repo, d.layers[0].path, d.layers[0].digest) == \
        ("test.repo", f"layers/{HEX}", HEX)


def test_older_repo_and_location_fields():
    d = thin.parse_descriptor(doc({"digest": HEX, "repo": "test.repo"},
                                  {"digest": HEX2, "repo": "ducc.repo", "location": "img/l"}),
                              ALLOWED)
    assert [(la.repo, la.path) for la in d.layers] == [
        ("test.repo", f"layers/{HEX}"), ("ducc.repo", f"img/l/{HEX2}")]


def test_paths_are_normalised_inside_the_repository():
    """A leading or doubled '/' or '.' stays inside the repository (no escape possible)."""
    d = thin.parse_descriptor(doc(url_layer("/./a//b/./c/")), ALLOWED)
    assert d.layers[0].path == "a/b/c"


@pytest.mark.parametrize("version", ["1", "1.0", "1.7"])
def test_every_1x_version_is_read(version):
    assert thin.parse_descriptor(doc(url_layer("a"), version=version), ALLOWED).version == version


def test_publisher_side_accepts_any_repository():
    d = thin.parse_descriptor(doc(url_layer("a", repo="other.example.org")), None)
    assert d.layers[0].repo == "other.example.org"


def test_125_layers_are_accepted():
    layers = [url_layer(f"l/{i}") for i in range(thin.MAX_THIN_LAYERS)]
    assert len(thin.parse_descriptor(doc(*layers), ALLOWED).layers) == 125


def test_to_json_round_trips():
    d = thin.parse_descriptor(doc(url_layer("a/b"), {"digest": HEX2, "repo": "ducc.repo"},
                                  origin="o"), ALLOWED)
    again = thin.parse_descriptor(d.to_json().encode(), ALLOWED)
    assert again == d


# ---------------------------------------------------------------------------- refused


def test_bad_json_is_named():
    msg = refused(b'{"version": "1.0", "layers": [')
    assert "thin.json is not valid JSON" in msg


def test_not_utf8_or_not_an_object():
    assert "not valid JSON" in refused(b"\xff\xfe{}")
    assert "must be a JSON object" in refused(b"[1, 2]")


@pytest.mark.parametrize("version", ["2.0", "0.9", None, 1])
def test_unknown_version_is_named(version):
    data = json.dumps({"version": version, "layers": [url_layer("a")]}).encode()
    msg = refused(data)
    assert f"version {version!r} is not supported" in msg
    assert "1.x" in msg


@pytest.mark.parametrize("url, scheme", [("http://test.repo/a", "http"),
                                         ("https://example.org/layer.tar", "https"),
                                         ("file:///etc", "file")])
def test_unknown_scheme_is_named(url, scheme):
    msg = refused(doc({"digest": HEX, "url": url}))
    assert "unsupported URL" in msg and f"scheme {scheme!r}" in msg
    assert "cvmfs://REPOSITORY/PATH" in msg
    assert "layer 0" in msg


def test_repository_not_allowed_is_named_with_the_allowed_ones():
    msg = refused(doc(url_layer("a"), url_layer("b", repo="evil.example.org")))
    assert "layer 1" in msg
    assert "repository evil.example.org is not allowed" in msg
    assert "ducc.repo, test.repo" in msg
    assert "repositories" in msg and "config.ini" in msg
    # The older form is checked the same way.
    assert "is not allowed" in refused(doc({"digest": HEX, "repo": "evil.example.org"}))


def test_nothing_allowed_means_no_thin_images():
    assert "(allowed: none)" in refused(doc(url_layer("a")), allowed=())


@pytest.mark.parametrize("path", ["../../etc", ".layers/../../../etc", "a/b/..", ".."])
def test_dotdot_escape_is_named(path):
    msg = refused(doc(url_layer(path)))
    assert "climbs out of the repository with '..'" in msg
    assert repr(path) in msg


def test_dotdot_escape_in_the_older_location_field():
    msg = refused(doc({"digest": HEX, "repo": "test.repo", "location": "../../etc"}))
    assert "'..'" in msg


@pytest.mark.parametrize("url", ["cvmfs:///etc/passwd", "cvmfs://../etc", "cvmfs://a b/x",
                                 "cvmfs://test.repo%2f..%2f/x"])
def test_bad_repository_names(url):
    assert "invalid repository name" in refused(doc({"digest": HEX, "url": url}))


@pytest.mark.parametrize("url", ["cvmfs://test.repo", "cvmfs://test.repo/", "cvmfs://test.repo/./"])
def test_repository_root_is_not_a_layer(url):
    msg = refused(doc({"digest": HEX, "url": url}))
    assert "names the repository root" in msg or "empty layer path" in msg


def test_nul_byte_in_path():
    assert "NUL" in refused(doc(url_layer("a\x00b")))


def test_too_many_layers_is_named():
    layers = [url_layer(f"l/{i}") for i in range(126)]
    msg = refused(doc(*layers))
    assert "thin.json lists 126 layers; at most 125" in msg
    assert "--flat" in msg


@pytest.mark.parametrize("layers", [None, [], {}, "x"])
def test_no_layers(layers):
    assert "has no layers" in refused(json.dumps({"version": "1.0", "layers": layers}).encode())


@pytest.mark.parametrize("entry, words", [
    ("just a string", "expected an object"),
    ({"digest": "abc", "url": "cvmfs://test.repo/a"}, "invalid digest"),
    ({"digest": HEX}, "needs a `url`"),
    ({"repo": "test.repo"}, "needs its digest"),
    ({"digest": HEX, "repo": "test.repo", "location": 5}, "location must be a string"),
    ({"digest": HEX, "url": 17}, "unsupported URL"),
])
def test_malformed_layer_entries(entry, words):
    assert words in refused(doc(entry))


def test_oversized_descriptor():
    msg = refused(b" " * (thin.MAX_DESCRIPTOR_BYTES + 1))
    assert "at most" in msg and "bytes" in msg


# ---------------------------------------------------------------------------- masks


def M(markers=(), deleted=(), opaque=()) -> LayerMarkers:
    return LayerMarkers(sorted(markers), sorted(deleted), sorted(opaque))


def plans_of(*layers: LayerMarkers):
    return [(p.whiteouts, p.opaque) for p in thin.plan_masks(list(layers))]


def test_no_markers_no_masks():
    plans = thin.plan_masks([M(), M()])
    assert len(plans) == 3 and all(p.empty for p in plans)


def test_deletion_goes_into_the_mask_below_the_deleting_layer():
    base = M()
    top = M(markers=["etc/.wh.motd"], deleted=["etc/motd"])
    assert plans_of(base, top) == [
        (set(), set()),  # mask-0: below the base layer
        ({"etc/motd"}, set()),  # mask-1: hides what layer 2 deletes from layer 1
        ({"etc/.wh.motd"}, set()),  # mask-2: hides layer 2's literal marker
    ]


def test_opaque_directory():
    top = M(markers=["data/opq/.wh..wh..opq"], opaque=["data/opq"])
    assert plans_of(M(), top) == [
        (set(), set()),
        (set(), {"data/opq"}),
        ({"data/opq/.wh..wh..opq"}, set()),
    ]


def test_root_opaque_is_not_a_mask_directory():
    """`/.wh..wh..opq` is handled by cutting the stack, not by an opaque mask root."""
    top = M(markers=[".wh..wh..opq"], opaque=[""])
    plans = plans_of(M(), top)
    assert plans[1] == (set(), set())
    assert plans[2] == ({".wh..wh..opq"}, set())
    # ... and layer 2 hides everything below it: the stack stops there.
    assert thin.stack_order(["l1", "l2"], {2}, {2}, has_parent=True) == [
        ("mask", 2), ("layer", 2)]


def test_stack_order_top_first_with_masks_between():
    assert thin.stack_order(["l1", "l2", "l3"], {0, 1, 3}, set(), has_parent=True) == [
        ("mask", 3), ("layer", 3), ("layer", 2), ("mask", 1), ("layer", 1), ("mask", 0)]
    # mask-0 (over the parent layer) only matters when there is a parent
    assert ("mask", 0) not in thin.stack_order(["l1"], {0}, set(), has_parent=False)


def test_stack_order_leaves_out_a_directory_stacked_twice():
    # overlayfs refuses a lower dir given twice (ELOOP); the upper copy shadows the lower.
    assert thin.stack_order(["a", "b", "a"], set(), set(), has_parent=False) == [
        ("layer", 3), ("layer", 2)]


def test_delete_then_recreate_becomes_opaque():
    """`.wh.d` plus markers inside d (AUFS-style delete and recreate) cannot be both a
    whiteout and a directory in one mask: the mask makes d opaque instead."""
    top = M(markers=[".wh.d", "d/.wh..wh..opq", "d/.wh.x", "e/.wh.y", ".wh.e"],
            deleted=["d", "d/x", "e", "e/y"], opaque=["d"])
    (w1, o1) = plans_of(M(), top)[1]
    assert o1 == {"d", "e"}
    assert "d" not in w1 and "e" not in w1
    assert {"d/x", "e/y"} <= w1


def test_plain_deletion_stays_a_whiteout():
    top = M(markers=[".wh.d"], deleted=["d"])
    assert plans_of(M(), top)[1] == ({"d"}, set())


def test_markers_are_hidden_in_the_mask_above_their_layer():
    l1 = M(markers=["a/.wh.x", "b/.wh..wh..opq"], deleted=["a/x"], opaque=["b"])
    l2 = M()
    plans = plans_of(l1, l2)
    assert plans[0] == ({"a/x"}, {"b"})  # mask-0 (below layer 1)
    assert plans[1] == ({"a/.wh.x", "b/.wh..wh..opq"}, set())  # literal markers of layer 1
    assert plans[2] == (set(), set())


def test_markers_under_deleted_or_opaque_dirs_are_dropped():
    l1 = M(markers=["gone/.wh.x", "gone/sub/.wh.y", "opq/.wh.z", "kept/.wh.w"],
           deleted=["gone/x", "gone/sub/y", "opq/z", "kept/w"])
    l2 = M(markers=[".wh.gone", "opq/.wh..wh..opq"], deleted=["gone"], opaque=["opq"])
    w1, o1 = plans_of(l1, l2)[1]
    assert w1 == {"gone", "kept/.wh.w"}
    assert o1 == {"opq"}


def test_masks_between_three_layers():
    l1 = M()
    l2 = M(markers=["a/.wh.f"], deleted=["a/f"])
    l3 = M(markers=["a/.wh.g", "a/.wh.h"], deleted=["a/g", "a/h"])
    plans = plans_of(l1, l2, l3)
    assert plans == [
        (set(), set()),
        ({"a/f"}, set()),
        ({"a/.wh.f", "a/g", "a/h"}, set()),
        ({"a/.wh.g", "a/.wh.h"}, set()),
    ]


# ---------------------------------------------------------------------------- markers


NAMES = [
    "./", "./etc/", "./etc/.wh.motd", "etc/passwd", "data/", "data/opq/",
    "data/opq/.wh..wh..opq", "data/opq/new", "./.wh.gone-dir", ".wh..wh..opq",
    "data/.wh..wh.plnk", "data/.wh..wh.aufs", "x/y/z/.wh.deep", "plain.wh.not-a-marker",
]


def markers_from_names(names):
    return LayerMarkers.from_names(split_member_name(n) for n in names)


def test_markers_from_tar_names():
    m = markers_from_names(NAMES)
    assert m.markers == sorted([
        "etc/.wh.motd", "data/opq/.wh..wh..opq", ".wh.gone-dir", ".wh..wh..opq",
        "data/.wh..wh.plnk", "data/.wh..wh.aufs", "x/y/z/.wh.deep"])
    assert sorted(m.deleted) == ["etc/motd", "gone-dir", "x/y/z/deep"]
    assert sorted(m.opaque) == ["", "data/opq"]
    assert not m.empty
    assert markers_from_names(["a", "b/", "b/c"]).empty


def test_markers_from_names_match_a_directory_scan(tmp_path):
    """What cvmfs-thin records at publish time equals what the driver finds by listing
    the published tree (the driver's fallback for DUCC's trees)."""
    root = tmp_path / "layerfs"
    for name in NAMES:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts:
            continue
        path = root.joinpath(*parts)
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    scanned = LayerMarkers.scan(str(root))
    recorded = markers_from_names(NAMES)
    assert (sorted(scanned.markers), sorted(scanned.deleted), sorted(scanned.opaque)) == \
        (sorted(recorded.markers), sorted(recorded.deleted), sorted(recorded.opaque))
    assert LayerMarkers.from_json(scanned.to_json()) == scanned


def test_layer_dir_has_duccs_shape():
    assert layer_dir(HEX) == f".layers/{HEX[:2]}/{HEX}/layerfs"


# ---------------------------------------------------------------------------- resolve


@pytest.fixture
def cvmfs_root(tmp_path) -> str:
    root = tmp_path / "cvmfs"
    (root / "test.repo" / ".layers" / HEX[:2] / HEX / "layerfs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return str(root)


def layer(path: str, repo: str = "test.repo") -> thin.ThinLayer:
    return thin.ThinLayer(repo, path, HEX)


def test_resolve_a_published_layer(cvmfs_root):
    got = thin.resolve_layer_dir(cvmfs_root, layer(f".layers/{HEX[:2]}/{HEX}/layerfs"))
    assert got == os.path.realpath(
        os.path.join(cvmfs_root, "test.repo", ".layers", HEX[:2], HEX, "layerfs"))


def test_symlink_inside_the_repository_is_followed(cvmfs_root):
    os.symlink(f".layers/{HEX[:2]}/{HEX}", os.path.join(cvmfs_root, "test.repo", "alias"))
    got = thin.resolve_layer_dir(cvmfs_root, layer("alias/layerfs"))
    assert got.endswith(f"/{HEX}/layerfs")


@pytest.mark.parametrize("target", ["/etc", "../../outside", "../", "/"])
def test_symlink_pointing_outside_the_repository_is_refused(cvmfs_root, target):
    os.symlink(target, os.path.join(cvmfs_root, "test.repo", "evil"))
    with pytest.raises(DriverError) as e:
        thin.resolve_layer_dir(cvmfs_root, layer("evil"))
    msg = str(e.value)
    assert "outside repository test.repo" in msg and "refusing to mount" in msg
    assert "cvmfs://test.repo/evil" in msg


def test_symlinked_parent_pointing_outside_is_refused(cvmfs_root, tmp_path):
    (tmp_path / "outside" / "layerfs").mkdir()
    os.symlink(str(tmp_path / "outside"), os.path.join(cvmfs_root, "test.repo", "d"))
    with pytest.raises(DriverError, match="outside repository test.repo"):
        thin.resolve_layer_dir(cvmfs_root, layer("d/layerfs"))


def test_symlink_into_another_repository_is_refused(cvmfs_root):
    other = os.path.join(cvmfs_root, "ducc.repo", "x")
    os.makedirs(other)
    os.symlink("../ducc.repo/x", os.path.join(cvmfs_root, "test.repo", "other"))
    with pytest.raises(DriverError, match="outside repository test.repo"):
        thin.resolve_layer_dir(cvmfs_root, layer("other"))


def test_missing_repository_is_named(cvmfs_root):
    with pytest.raises(DriverError) as e:
        thin.resolve_layer_dir(cvmfs_root, layer("a", repo="ducc.repo"))
    msg = str(e.value)
    assert "CVMFS repository ducc.repo is not available" in msg
    assert "cvmfs_config probe ducc.repo" in msg
    assert "CVMFS_REPOSITORIES" in msg


def test_missing_layer_is_named(cvmfs_root):
    path = f".layers/00/{HEX2}/layerfs"
    with pytest.raises(DriverError) as e:
        thin.resolve_layer_dir(cvmfs_root, layer(path))
    msg = str(e.value)
    assert f"thin layer cvmfs://test.repo/{path} is missing" in msg
    assert "test.repo" in msg and "cvmfs_config probe test.repo" in msg


def test_a_file_is_not_a_layer(cvmfs_root):
    with open(os.path.join(cvmfs_root, "test.repo", "file"), "w") as f:
        f.write("x")
    with pytest.raises(DriverError, match="is missing"):
        thin.resolve_layer_dir(cvmfs_root, layer("file"))


def test_a_scan_also_hides_cvmfs_bookkeeping_files(tmp_path):
    root = tmp_path / "layerfs"
    (root / "a").mkdir(parents=True)
    for rel in (".cvmfscatalog", "a/.cvmfscatalog", "a/.wh.x", "a/keep"):
        (root / rel).write_text("")
    (root / ".cvmfsdirtab").mkdir()  # a directory of that name is an image's own
    m = LayerMarkers.scan(str(root), thin.CVMFS_BOOKKEEPING)
    assert sorted(m.markers) == [".cvmfscatalog", "a/.cvmfscatalog", "a/.wh.x"]
    assert m.deleted == ["a/x"] and m.opaque == []
    assert LayerMarkers.scan(str(root)).markers == ["a/.wh.x"]



# ---------------------------------------------------------------------------- repository files
# (issue 11, finding 8) Files the daemon reads from a repository (a layer's .metadata/,
# which the snapshotter's lazy pulls and the graph driver's masks use) and from a layer's
# diff (thin.json) are read only as regular files: never a FIFO (its open would block
# the daemon), a device, a directory, or through a symlink; at most their size cap.

HANG_SECONDS = 5


def returns_promptly(action, fifos):
    """`action()`, failing (after releasing it) if it blocks on opening one of `fifos`."""
    out = {}

    def run():
        try:
            out["value"] = action()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_SECONDS)
    if t.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(30)
        pytest.fail(f"hung for {HANG_SECONDS} s opening a FIFO")
    if "error" in out:
        raise out["error"]
    return out["value"]


NOT_FILES = ["fifo", "symlink", "directory", "device", "oversized"]


def not_a_file(kind: str, path: str, inside: str, content: bytes) -> None:
    """Put something that is not a usable regular file at `path`; a symlink points at a
    regular file with `content` inside the repository `inside`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        target = os.path.join(inside, "elsewhere.json")
        with open(target, "wb") as f:
            f.write(content)
        os.symlink(target, path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "device":
        need(os.geteuid() == 0, "mknod of a device needs root")
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    elif kind == "oversized":
        with open(path, "wb") as f:
            f.write(content)
            f.truncate(thin.MAX_METADATA_BYTES + 1)


DIFF_ID = "sha256:" + HEX2
ORIGIN = json.dumps({"diff_id": DIFF_ID}).encode()


@pytest.fixture
def layerfs(cvmfs_root) -> str:
    return os.path.join(cvmfs_root, "test.repo", ".layers", HEX[:2], HEX, "layerfs")


def origin_path(layerfs: str) -> str:
    meta = os.path.join(os.path.dirname(layerfs), thin.METADATA_DIR)
    os.makedirs(meta, exist_ok=True)
    return os.path.join(meta, thin.ORIGIN_FILE)


def test_a_published_diff_id_is_read_from_a_regular_origin_file(cvmfs_root, layerfs):
    with open(origin_path(layerfs), "wb") as f:
        f.write(ORIGIN)
    got = thin.published_diff_id(cvmfs_root, layer(thin.layer_path(HEX)), layerfs)
    assert got == DIFF_ID


@pytest.mark.parametrize("kind", NOT_FILES)
def test_an_origin_file_that_is_not_a_regular_file_is_not_read(cvmfs_root, layerfs, kind,
                                                               caplog):
    """What the snapshotter's lazy pulls check a layer against (remote.is_the_layer):
    none, so containerd downloads the layer; the daemon goes on at once."""
    path = origin_path(layerfs)
    not_a_file(kind, path, os.path.join(cvmfs_root, "test.repo"), ORIGIN)
    got = returns_promptly(
        lambda: thin.published_diff_id(cvmfs_root, layer(thin.layer_path(HEX)), layerfs),
        [path])
    assert got is None
    assert f"ignoring .metadata/origin.json of cvmfs://test.repo/{thin.layer_path(HEX)}: it " \
        in caplog.text


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device", "oversized"])
def test_a_thin_json_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    diff = tmp_path / "diff"
    diff.mkdir()
    path = str(diff / thin.DESCRIPTOR_NAME)
    good = doc(url_layer("a"))
    not_a_file(kind, path, str(tmp_path), good)  # a symlink: to a valid descriptor
    with pytest.raises(thin.DescriptorError) as e:
        returns_promptly(lambda: thin.descriptor_in(str(diff), ALLOWED), [path])
    assert str(e.value).startswith("thin.json is ")
