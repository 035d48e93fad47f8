"""Hostile layer tars: every attempt to write, link, delete or mark anything outside the
layer directory is refused with an error naming the entry, and nothing outside changes."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Callable, List

import pytest
from layer_tools import TarBuilder, apply, make_layer, snapshot, view_manifest, xattr

from cvmfs_graphdriver.errors import DriverError

pytestmark = pytest.mark.root

EVIL_TMP = f"/tmp/cgd-evil-{secrets.token_hex(6)}"
LAYER_FILES = {"diff", "link", "committed", "lower", "parent", "work", ".applying", ".unapplied"}


@dataclass
class Scene:
    drv: object
    tmp: str
    sentinel: str  # a directory next to the layers, outside any layer
    layer: str
    layer_dir: str
    diff: str
    before: dict
    passwd: tuple

    def check_nothing_outside_changed(self) -> None:
        after = snapshot(self.tmp, skip=[self.diff, os.path.join(self.layer_dir, ".applying"),
                              os.path.join(self.layer_dir, ".unapplied")],
                         ignore_mtime=[self.layer_dir])
        assert after == self.before
        assert set(os.listdir(self.layer_dir)) <= LAYER_FILES
        assert _passwd_state() == self.passwd
        for p in (EVIL_TMP, "/evil", os.path.join(self.sentinel, "evil"),
                  os.path.join(self.layer_dir, "evil")):
            assert not os.path.lexists(p), p


def _passwd_state() -> tuple:
    st = os.lstat("/etc/passwd")
    with open("/etc/passwd", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, digest,
            tuple(sorted(os.listxattr("/etc/passwd"))))


@pytest.fixture
def scene(drv, tmp_path) -> Scene:
    tmp = str(tmp_path)
    sentinel = os.path.join(tmp, "sentinel")
    os.makedirs(os.path.join(sentinel, "dir"))
    with open(os.path.join(sentinel, "victim"), "w") as f:
        f.write("original")
    os.chmod(os.path.join(sentinel, "victim"), 0o644)
    with open(os.path.join(sentinel, "dir", "inner"), "w") as f:
        f.write("inner")
    layer = make_layer(drv)
    layer_dir = os.path.join(drv.layout.home, layer)
    diff = os.path.join(layer_dir, "diff")
    before = snapshot(tmp, skip=[diff, os.path.join(layer_dir, ".unapplied")],
                      ignore_mtime=[layer_dir])
    assert os.path.relpath(sentinel, diff) == "../../../sentinel"
    return Scene(drv, tmp, sentinel, layer, layer_dir, diff, before, _passwd_state())


# Each case: (id, build(sentinel) -> TarBuilder, the entry name the error must quote, where
# "{s}" stands for the sentinel directory)
Build = Callable[[str], TarBuilder]
REFUSED: List[tuple] = [
    ("dotdot", lambda s: TarBuilder().file("../evil", b"x"), "../evil"),
    ("dotdot-to-sentinel", lambda s: TarBuilder().file("../../../sentinel/evil", b"x"),
     "../../../sentinel/evil"),
    ("dotdot-inside-path", lambda s: TarBuilder().dir("a").file("a/../../evil", b"x"),
     "a/../../evil"),
    ("dotdot-dir", lambda s: TarBuilder().dir("../../../sentinel/evil"),
     "../../../sentinel/evil"),
    ("absolute-tmp", lambda s: TarBuilder().file(EVIL_TMP, b"x"), EVIL_TMP),
    ("absolute-sentinel", lambda s: TarBuilder().file(f"{s}/evil", b"x"), "{s}/evil"),
    ("absolute-symlink-entry", lambda s: TarBuilder().symlink("/evil", "/etc/passwd"),
     "/evil"),
    ("symlink-parent-absolute",
     lambda s: TarBuilder().symlink("link", s).file("link/evil", b"x"), "link/evil"),
    ("symlink-parent-relative",
     lambda s: TarBuilder().symlink("up", "../../../sentinel").file("up/evil", b"x"),
     "up/evil"),
    ("symlink-parent-deep",
     lambda s: TarBuilder().dir("a").symlink("a/link", s).file("a/link/evil", b"x"),
     "a/link/evil"),
    ("symlink-dotdot-chain",
     lambda s: TarBuilder().symlink("a", "..").symlink("b", "a/a/a")
     .file("b/sentinel/evil", b"x"), "b/sentinel/evil"),
    ("symlink-dotdot-self",
     lambda s: TarBuilder().symlink("a", "..").dir("a/a/a/sentinel/evil"),
     "a/a/a/sentinel/evil"),
    ("dir-then-symlink-then-entry",
     lambda s: TarBuilder().dir("d").file("d/f", b"ok").symlink("d", s).file("d/evil", b"x"),
     "d/evil"),
    ("dir-through-symlink", lambda s: TarBuilder().symlink("link", s).dir("link/evil"),
     "link/evil"),
    ("symlink-through-symlink",
     lambda s: TarBuilder().symlink("link", s).symlink("link/evil", "/etc/passwd"),
     "link/evil"),
    ("device-through-symlink",
     lambda s: TarBuilder().symlink("link", s).device("link/evil", 1, 3), "link/evil"),
    ("fifo-through-symlink",
     lambda s: TarBuilder().symlink("link", s).fifo("link/evil"), "link/evil"),
    ("whiteout-through-symlink",
     lambda s: TarBuilder().symlink("link", s).file("link/.wh.victim"), "link/.wh.victim"),
    ("opaque-through-symlink",
     lambda s: TarBuilder().symlink("link", f"{s}/dir").file("link/.wh..wh..opq"),
     "link/.wh..wh..opq"),
    ("whiteout-of-dotdot", lambda s: TarBuilder().file(".wh..."), ".wh..."),
    ("whiteout-of-dotdot-below", lambda s: TarBuilder().dir("sub").file("sub/.wh..."),
     "sub/.wh..."),
    ("whiteout-of-dot", lambda s: TarBuilder().file(".wh.."), ".wh.."),
    ("hardlink-dotdot",
     lambda s: TarBuilder().hardlink("hl", "../../../sentinel/victim"), "hl"),
    ("hardlink-absolute", lambda s: TarBuilder().hardlink("hl", "/etc/passwd"), "hl"),
    ("hardlink-absolute-sentinel",
     lambda s: TarBuilder().hardlink("hl", f"{s}/victim", mode=0o4777, uid=1234), "hl"),
    ("hardlink-through-symlinked-dir",
     lambda s: TarBuilder().symlink("etc", "/etc").hardlink("hl", "etc/passwd"), "hl"),
    ("hardlink-through-relative-symlinked-dir",
     lambda s: TarBuilder().symlink("s", "../../../sentinel").hardlink("hl", "s/victim"),
     "hl"),
    ("hardlink-name-through-symlink",
     lambda s: TarBuilder().file("f", b"f").symlink("link", s).hardlink("link/evil", "f"),
     "link/evil"),
    ("hardlink-to-missing", lambda s: TarBuilder().hardlink("hl", "nothing-here"), "hl"),
    ("hardlink-to-directory", lambda s: TarBuilder().dir("d").hardlink("hl", "d"), "hl"),
    ("root-as-file", lambda s: TarBuilder().file("./", b"x"), "./"),
]


@pytest.mark.parametrize("build, entry", [(b, e) for _, b, e in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_escape_is_refused_and_nothing_outside_changes(scene, tally, build: Build, entry: str):
    data = build(scene.sentinel).bytes()
    with pytest.raises(DriverError) as e:
        apply(scene.drv, scene.layer, "", data)
    msg = str(e.value)
    assert repr(entry.format(s=scene.sentinel)) in msg, msg
    assert scene.layer in msg
    scene.check_nothing_outside_changed()
    tally.hostile(refused=True)
    assert not scene.drv.exists(scene.layer), "a refused layer must not count as present"


def test_file_replacing_a_symlink_does_not_write_through_it(scene, tally):
    data = (TarBuilder().symlink("f", f"{scene.sentinel}/victim")
            .file("f", b"new content", mode=0o4777, uid=1234)
            .symlink("d", f"{scene.sentinel}/dir").dir("d", mode=0o700).file("d/x", b"x")
            .symlink("rel", "../../../sentinel/victim").fifo("rel")
            .bytes())
    apply(scene.drv, scene.layer, "", data)
    scene.check_nothing_outside_changed()
    tally.hostile(refused=False)
    st = os.lstat(os.path.join(scene.diff, "f"))
    assert stat.S_ISREG(st.st_mode) and (stat.S_IMODE(st.st_mode), st.st_uid) == (0o4777, 1234)
    with open(os.path.join(scene.diff, "f"), "rb") as f:
        assert f.read() == b"new content"
    st = os.lstat(os.path.join(scene.diff, "d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert os.listdir(os.path.join(scene.diff, "d")) == ["x"]
    assert stat.S_ISFIFO(os.lstat(os.path.join(scene.diff, "rel")).st_mode)


def test_hard_link_to_a_symlink_links_the_symlink_not_its_target(scene, tally):
    data = (TarBuilder().symlink("s", f"{scene.sentinel}/victim")
            .hardlink("h", "s", mode=0o4777, uid=1234)
            .symlink("dirlink", scene.sentinel).hardlink("h2", "dirlink")
            .bytes())
    apply(scene.drv, scene.layer, "", data)
    scene.check_nothing_outside_changed()
    tally.hostile(refused=False)
    s = os.lstat(os.path.join(scene.diff, "s"))
    h = os.lstat(os.path.join(scene.diff, "h"))
    assert stat.S_ISLNK(h.st_mode) and h.st_ino == s.st_ino
    assert os.readlink(os.path.join(scene.diff, "h")) == f"{scene.sentinel}/victim"
    assert stat.S_ISLNK(os.lstat(os.path.join(scene.diff, "h2")).st_mode)


def test_overlay_xattrs_in_a_tar_are_dropped(drv, scene, tally):
    sentinel_before = snapshot(scene.sentinel)
    base = make_layer(drv, data=TarBuilder().dir("d").file("d/old", b"old").bytes())
    smuggled = {
        "trusted.overlay.opaque": b"y",
        "trusted.overlay.redirect": b"/etc",
        "trusted.overlay.origin": b"\x00\xfb\x1d",
        "trusted.overlay.metacopy": b"",
        "user.kept": b"yes",
    }
    child = make_layer(drv, base)
    apply(drv, child, base, TarBuilder().dir("d", xattrs=smuggled)
          .file("d/new", b"n", xattrs=smuggled).dir(".", xattrs=smuggled).bytes())
    diff = os.path.join(drv.layout.home, child, "diff")
    for p in (diff, os.path.join(diff, "d"), os.path.join(diff, "d", "new")):
        names = os.listxattr(p)
        assert not [n for n in names if n.startswith("trusted.overlay.")], (p, names)
        # the "." entry changes nothing of the layer root (moby's Unpack skips it)
        assert xattr(p, "user.kept") == (None if p == diff else b"yes")
    # the smuggled opaque flag hides nothing of the parent layer
    view = drv.get(child)
    assert set(view_manifest(view)) == {"/d", "/d/old", "/d/new"}
    drv.put(child)
    assert snapshot(scene.sentinel) == sentinel_before
    tally.hostile(refused=False)


def test_layer_stays_usable_after_a_refused_tar_is_retried_with_a_good_one(scene, tally):
    with pytest.raises(DriverError):
        apply(scene.drv, scene.layer, "",
              TarBuilder().file("ok", b"1").symlink("l", scene.sentinel)
              .file("l/evil", b"x").bytes())
    tally.hostile(refused=True)
    scene.drv.remove(scene.layer)
    scene.drv.create(scene.layer, "", "", None, read_write=False)
    apply(scene.drv, scene.layer, "", TarBuilder().file("ok", b"1").bytes())
    assert scene.drv.exists(scene.layer)
    assert os.listdir(scene.drv.get(scene.layer)) == ["ok"]
