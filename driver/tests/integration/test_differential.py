"""Differential tests: our driver against dockerd's built-in overlay2, on the same image.

One image with every awkward filesystem feature (see images.py) is built on the
overlay2 daemon, saved and loaded into the daemon that uses our driver. Then what a
user sees must be the same under both: `docker export` of containers, `docker diff`
after the same changes, `docker commit` results and the committed layer tar. Finally
the same Dockerfile is built directly on our driver and must give the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import tarfile
from typing import Dict, List, Tuple

import images
import pytest
from harness import Dockerd, import_busybox

pytestmark = pytest.mark.docker

REF_TAG = "cgd-diff:ref"
OURS_TAG = "cgd-diff:ours"


def _mismatch(ours: Dict[str, tuple], ref: Dict[str, tuple], what: str) -> str:
    lines = [f"{what}: our driver differs from overlay2"]
    for name in sorted(set(ours) | set(ref)):
        if ours.get(name) != ref.get(name):
            lines.append(f"  {name!r}:\n    ours:     {ours.get(name)}\n"
                         f"    overlay2: {ref.get(name)}")
    return "\n".join(lines[:40])


def assert_same_manifest(ours: Dict[str, tuple], ref: Dict[str, tuple], what: str) -> None:
    assert ours == ref, _mismatch(ours, ref, what)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def build_context(workdir) -> str:
    return images.write_context(os.path.join(workdir, "differential", "context"))


@pytest.fixture(scope="session")
def ref_image(ref_dockerd: Dockerd, workdir, build_context) -> str:
    """The awkward image, built by the classic builder on overlay2."""
    import_busybox(ref_dockerd, os.path.join(workdir, "differential", "ref"), images.BASE_TAG)
    return images.build(ref_dockerd, build_context, REF_TAG)


@pytest.fixture(scope="session")
def loaded_image(ref_image: str, ref_dockerd: Dockerd, dockerd: Dockerd) -> str:
    """The same image, `docker save`d from overlay2 and `docker load`ed into our driver."""
    images.transfer(ref_dockerd, dockerd, REF_TAG)
    return images.image_id(dockerd, REF_TAG)


@pytest.fixture(scope="session")
def ref_export(ref_dockerd: Dockerd, ref_image: str) -> Dict[str, tuple]:
    return images.export_of(ref_dockerd, REF_TAG)


def _run_changes(d: Dockerd, name: str) -> str:
    d.docker("rm", "-f", name, check=False)
    d.docker("run", "--name", name, "--network", "none", REF_TAG, "sh", "-c",
             images.CONTAINER_SCRIPT)
    return name


@pytest.fixture(scope="session")
def changed(ref_dockerd: Dockerd, dockerd: Dockerd, loaded_image: str):
    """A stopped container under each daemon after the same changes: (ours, ref)."""
    names = (_run_changes(dockerd, "cgd-diff-changed"),
             _run_changes(ref_dockerd, "cgd-diff-changed"))
    yield names
    for d, name in ((dockerd, names[0]), (ref_dockerd, names[1])):
        d.docker("rm", "-f", name, check=False)


@pytest.fixture(scope="session")
def committed(ref_dockerd: Dockerd, dockerd: Dockerd, changed) -> str:
    tag = "cgd-diff:committed"
    dockerd.docker("commit", changed[0], tag)
    ref_dockerd.docker("commit", changed[1], tag)
    return tag


# ---------------------------------------------------------------------------- image


def test_reference_build_has_the_intended_layers(ref_dockerd: Dockerd, ref_image: str):
    """Guard against a build that silently lost whiteouts or the opaque directory."""
    layers = [images.layer_entries(t) for t in images.saved_layers(ref_dockerd, REF_TAG)]
    assert len(layers) == 5, [len(x) for x in layers]  # base + RUN + ADD + RUN + RUN
    names = [{e[0] for e in layer} for layer in layers]
    assert "data/cap/netraw" in names[2]
    assert {"data/.wh.gone-file", "data/.wh.gone-tree", "data/.wh.recreated",
            "data/opq/.wh..wh..opq", "data/opq/new"} <= names[3], sorted(names[3])
    assert "data/recreated/new" in names[4] and "data/recreated/.wh..wh..opq" not in names[4]
    hard = {e[0]: e[6] for e in layers[1] if e[1] == images.HARD}
    assert hard == {"data/links/h2": "data/links/h1", "data/links/h3": "data/links/h1"}


def test_load_keeps_the_image_id(ref_image: str, loaded_image: str):
    assert loaded_image == ref_image


def test_export_matches_overlay2(dockerd: Dockerd, loaded_image: str,
                                 ref_export: Dict[str, tuple]):
    ours = images.export_of(dockerd, REF_TAG)
    assert_same_manifest(ours, ref_export, "docker export of the loaded image")


def test_export_holds_the_tricky_entries(ref_export: Dict[str, tuple]):
    """The compared export really contains what the Dockerfile made (and not more)."""
    m = ref_export
    for name, (kind, perms, uid, gid, link) in images.EXPECTED.items():
        assert name in m, f"{name!r} missing from the export"
        got = m[name]
        assert (got[0], stat.S_IMODE(int(got[1], 8)), got[2], got[3]) == (kind, perms, uid, gid), \
            f"{name!r}: {got}"
        if link is not None:
            assert got[6] == link, f"{name!r} links to {got[6]!r}, expected {link!r}"
    for name in images.CAP_FILES:
        assert m[name][9] == (("SCHILY.xattr.security.capability", images.CAP_PAX_VALUE),), \
            f"{name!r} lost its file capability: {m[name]}"
    assert m["data/chardev"][7:9] == (1, 3)
    assert len(images.LONG_FILE) == 255 and len(f"data/deep/{images.DEEP_DIR}/file") > 200
    for name in images.DELETED:
        assert name not in m, f"{name!r} was deleted by a later layer but is in the export"
    assert [n for n in m if n.startswith("data/opq/")] == ["data/opq/new"]
    assert [n for n in m if n.startswith("data/recreated/")] == ["data/recreated/new"]
    assert not [n for n in m if ".wh." in n], "whiteout markers leaked into the export"


# ---------------------------------------------------------------------------- container


def _diff_lines(d: Dockerd, container: str) -> List[str]:
    return d.out("diff", container).splitlines()


def _misordered(lines: List[str]) -> List[str]:
    """Lines listed before a directory above them that is listed too.

    overlay2's `docker diff` order is not stable: moby's ChangesDirs walks Go maps, so two
    calls on the same container list the entries of a directory in different orders. What
    is stable is the structure: a directory comes before what it contains.
    """
    seen: set = set()
    listed = {line[2:] for line in lines}
    bad = []
    for line in lines:
        path = line[2:]
        parents = [path[:i] for i in range(1, len(path)) if path[i] == "/"]
        if any(p in listed and p not in seen for p in parents):
            bad.append(line)
        seen.add(path)
    return bad


def test_docker_diff_matches_overlay2(ref_dockerd: Dockerd, dockerd: Dockerd, changed):
    ours, ref = _diff_lines(dockerd, changed[0]), _diff_lines(ref_dockerd, changed[1])
    only_ours = sorted(set(ours) - set(ref))
    only_ref = sorted(set(ref) - set(ours))
    assert sorted(ours) == sorted(ref), (
        f"docker diff differs\n  only ours: {only_ours}\n  only overlay2: {only_ref}\n"
        f"  ours: {ours}"
    )
    assert len(set(ours)) == len(ours), f"duplicate lines: {ours}"
    assert not _misordered(ref), ref  # the order property below holds for overlay2 itself
    assert not _misordered(ours), f"listed before their directory: {_misordered(ours)}"
    assert _diff_lines(dockerd, changed[0]) == ours, "our docker diff order is not stable"
    # The comparison means something only if the script's changes show up at all.
    for line in ("A /data/new-file", "C /data/keep/file", "D /data/tree/a/b", "D /data/long",
                 f"D /data/{images.NAIVE}", "A /data/deep-moved", "D /data/deep",
                 "C /data/modes/suid", "D /data/fifo", "A /data/new-fifo", "C /data/opq",
                 "D /data/opq/new", "A /data/opq/again", "C /data/empty"):
        assert line in ref, f"{line!r} not in overlay2's docker diff: {ref}"
    # moby ignores mtime on block devices (its "is a directory" test is a bit mask).
    assert "C /data/blockdev" not in ref


def test_changed_container_export_matches_overlay2(ref_dockerd: Dockerd, dockerd: Dockerd,
                                                   changed):
    ours = images.export_container(dockerd, changed[0])
    ref = images.export_container(ref_dockerd, changed[1])
    assert_same_manifest(ours, ref, "docker export of the changed container")
    assert ref["data/links/h4"][6] == "data/links/h1" or ref["data/links/h1"][6] == "data/links/h4"
    assert "data/tree/a/b" not in ref and "data/opq/new" not in ref and "data/opq/again" in ref


def test_committed_image_matches_overlay2(ref_dockerd: Dockerd, dockerd: Dockerd, committed):
    ours = images.export_of(dockerd, committed)
    ref = images.export_of(ref_dockerd, committed)
    assert_same_manifest(ours, ref, "docker export of a container of the committed image")
    assert ref["data/f2d"][0] == images.REG and ref["data/d2f"][0] == images.DIR
    assert not [n for n in ours if ".wh." in n], "whiteout markers leaked into the export"


def test_committed_layer_tar_matches_overlay2(ref_dockerd: Dockerd, dockerd: Dockerd, committed):
    ours_layers = images.saved_layers(dockerd, committed)
    ref_layers = images.saved_layers(ref_dockerd, committed)
    assert len(ours_layers) == len(ref_layers) == 6
    ours, ref = images.layer_entries(ours_layers[-1]), images.layer_entries(ref_layers[-1])
    assert ours == ref, (
        "committed layer tar differs\n  only ours:     "
        + "\n                 ".join(map(repr, sorted(ours - ref)))
        + "\n  only overlay2: "
        + "\n                 ".join(map(repr, sorted(ref - ours)))
    )
    names = {e[0] for e in ref}
    assert {"data/links/.wh.h2", "data/tree/a/.wh.b", "data/opq/.wh..wh..opq",
            "data/.wh.long", "data/.wh.fifo"} <= names, sorted(names)
    # Both walk the upper dir in byte order of names, so even the entry order agrees.
    assert images.layer_names(ours_layers[-1]) == images.layer_names(ref_layers[-1])
    # The lower layers are the loaded ones: byte-for-byte what overlay2 saved.
    assert ours_layers[:-1] == ref_layers[:-1]


# ---------------------------------------------------------------------------- diff ID

DIFF_ID_MTIME = 1_700_000_000
# The same changes under each daemon, then one mtime on every path that reaches the upper
# dir: what the script made or changed, and every directory copied up on the way (from
# /data down). Only the whiteouts are out of reach: a container cannot see them, and the
# kernel makes them all links to one whiteout inode created at the time of the first
# deletion; the test gives them the same mtime from the host.
DIFF_ID_SCRIPT = f"""\
set -e; cd /data
echo added > new-file
ln new-file new-hl
mkdir -p new-dir/sub; echo n > new-dir/sub/f
echo more >> keep/file
rm links/h2
ln -s ../new-file links/new-sym
rm -rf tree/a/b
chmod 600 tree/a/top
rm -rf opq; mkdir opq; echo again > opq/again
echo s > setuid-file; chmod 4755 setuid-file
chown 42:43 owned/file
chmod 4711 modes/sgid
chmod 0750 cap/netraw
ln -s /gone/away new-dangling
mkfifo new-fifo
touch -h -d @{DIFF_ID_MTIME} . new-file new-hl new-dir new-dir/sub new-dir/sub/f keep \\
    keep/file links links/new-sym tree tree/a tree/a/top opq opq/again setuid-file \\
    owned owned/file modes modes/sgid cap cap/netraw new-dangling new-fifo
"""


def _native_diff(d: Dockerd) -> str:
    return dict(d.info()["DriverStatus"]).get("Native Overlay Diff", "?")


def _upper_dir(d: Dockerd, container: str) -> str:
    return json.loads(d.out("inspect", "-f", "{{json .GraphDriver.Data}}",
                            container))["UpperDir"]


def _upper_listing(upper: str) -> Dict[str, tuple]:
    """What moby's archiver reads from an upper dir, for every entry in it."""
    out: Dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            xattrs = []
            for key in ("security.capability", "trusted.overlay.opaque"):
                with contextlib.suppress(OSError):
                    xattrs.append((key, os.getxattr(full, key, follow_symlinks=False)))
            digest = ""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
            out[os.path.relpath(full, upper)] = (
                stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_nlink, st.st_rdev,
                os.readlink(full) if stat.S_ISLNK(st.st_mode) else "", digest, tuple(xattrs),
                st.st_mtime_ns,
            )
    return out


def _whiteouts_to_fixed_mtime(upper: str) -> None:
    for dirpath, _, filenames in os.walk(upper):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                ns = DIFF_ID_MTIME * 1_000_000_000
                os.utime(full, ns=(ns, ns), follow_symlinks=False)


_HEADER_FIELDS = (("name", 100), ("mode", 8), ("uid", 8), ("gid", 8), ("size", 12),
                  ("mtime", 12), ("chksum", 8), ("typeflag", 1), ("linkname", 100),
                  ("magic", 6), ("version", 2), ("uname", 32), ("gname", 32),
                  ("devmajor", 8), ("devminor", 8), ("prefix", 155), ("pad", 12))


def _first_difference(ours: bytes, ref: bytes) -> str:
    """Where two layer tars first differ: which entry, which header field, both values."""
    off = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b),
               min(len(ours), len(ref)))
    where = "after the last entry"
    with tarfile.open(fileobj=io.BytesIO(ref), mode="r:") as tf:
        for m in tf.getmembers():
            if m.offset <= off < m.offset_data + (m.size + 511) // 512 * 512:
                if off >= m.offset_data:
                    return f"first difference at byte {off}: content of {m.name!r}"
                start = m.offset_data - 512
                where = f"an extended (PAX) header before {m.name!r}"
                if off >= start:
                    where = f"the header of {m.name!r}"
                    pos = start
                    for field, size in _HEADER_FIELDS:
                        if pos <= off < pos + size:
                            return (f"first difference at byte {off}: {where}, field {field}: "
                                    f"ours {ours[pos:pos + size]!r}, "
                                    f"overlay2 {ref[pos:pos + size]!r}")
                        pos += size
                break
    return f"first difference at byte {off}: {where}"


def _diff_id_of_change(d: Dockerd, name: str, tag: str) -> Tuple[str, Dict[str, tuple]]:
    """Run the script in a container, fix the whiteouts' mtime, commit: (diff ID, upper)."""
    d.docker("rm", "-f", name, check=False)
    d.docker("run", "--name", name, "--network", "none", REF_TAG, "sh", "-c", DIFF_ID_SCRIPT)
    upper = _upper_dir(d, name)
    _whiteouts_to_fixed_mtime(upper)
    listing = _upper_listing(upper)
    d.docker("commit", name, tag)
    layers = json.loads(d.out("inspect", "-f", "{{json .RootFS.Layers}}", tag))
    return layers[-1], listing


def test_committed_diff_id_matches_overlay2(ref_dockerd: Dockerd, dockerd: Dockerd,
                                            loaded_image: str):
    """The same change committed under both drivers is the same layer, to the byte: same
    diff ID (the sha256 of the layer tar), so images built here and under overlay2 share
    their layers."""
    native = (_native_diff(dockerd), _native_diff(ref_dockerd))
    assert native[0] == native[1], f"Native Overlay Diff: ours {native[0]}, overlay2 {native[1]}"
    if native != ("true", "true"):
        pytest.skip("this kernel makes both drivers use the naive diff (redirect_dir), whose "
                    "whiteouts carry the time of the diff: no two diff IDs can agree")
    name, tag = "cgd-diff-id", "cgd-diff:diff-id"
    try:
        ours_id, ours_upper = _diff_id_of_change(dockerd, name, tag)
        ref_id, ref_upper = _diff_id_of_change(ref_dockerd, name, tag)

        # The script's changes are really there, and nothing kept its own mtime: otherwise
        # the comparison below would be about the test, not the driver.
        for path, kind in (("data/links/h2", stat.S_IFCHR), ("data/tree/a/b", stat.S_IFCHR),
                           ("data/opq", stat.S_IFDIR), ("data/new-hl", stat.S_IFREG),
                           ("data/links/new-sym", stat.S_IFLNK), ("data/new-fifo", stat.S_IFIFO)):
            assert ref_upper.get(path, (None,))[0] == kind, (path, ref_upper.get(path))
        assert ref_upper["data/opq"][9] == (("trusted.overlay.opaque", b"y"),)
        assert ref_upper["data/cap/netraw"][9][0][0] == "security.capability"
        assert ref_upper["data/new-hl"][5] == 2 and ref_upper["data/setuid-file"][1] == "0o4755"
        stray = sorted(p for p, e in ref_upper.items()
                       if e[10] != DIFF_ID_MTIME * 1_000_000_000)
        assert not stray, f"upper-dir entries the test left with their own mtime: {stray}"
        assert_same_manifest(ours_upper, ref_upper, "upper dir of the changed container")

        ours_layer = images.saved_layers(dockerd, tag)[-1]
        ref_layer = images.saved_layers(ref_dockerd, tag)[-1]
        names = set(images.layer_names(ref_layer))
        assert {"data/links/.wh.h2", "data/tree/a/.wh.b", "data/opq/.wh..wh..opq",
                "data/opq/again", "data/new-hl", "data/cap/netraw"} <= names, sorted(names)
        assert ours_id == ref_id, (
            f"diff IDs differ: ours {ours_id}, overlay2 {ref_id}\n"
            f"  saved layer tars: ours {len(ours_layer)} bytes, overlay2 {len(ref_layer)} bytes"
            f"\n  {_first_difference(ours_layer, ref_layer)}"
            "\n  entries only in ours:     "
            + "\n                            ".join(
                map(repr, sorted(images.layer_entries(ours_layer)
                                 - images.layer_entries(ref_layer))))
            + "\n  entries only in overlay2: "
            + "\n                            ".join(
                map(repr, sorted(images.layer_entries(ref_layer)
                                 - images.layer_entries(ours_layer))))
        )
        assert ours_layer == ref_layer
        assert ref_id == "sha256:" + hashlib.sha256(ref_layer).hexdigest()
    finally:
        for d in (dockerd, ref_dockerd):
            d.docker("rm", "-f", name, check=False)
            d.docker("rmi", tag, check=False)


# ---------------------------------------------------------------------------- build


def test_build_under_our_driver_matches_overlay2(dockerd: Dockerd, workdir, build_context,
                                                 ref_export: Dict[str, tuple]):
    import_busybox(dockerd, os.path.join(workdir, "differential", "ours"), images.BASE_TAG)
    images.build(dockerd, build_context, OURS_TAG)
    ours = images.export_of(dockerd, OURS_TAG)
    assert_same_manifest(ours, ref_export, "docker export of the image built under our driver")
