"""Tar member names, and diffs/changes/sizes of plain directory trees (no root needed)."""

from __future__ import annotations

import os
import shutil

import pytest

from cvmfs_graphdriver import archive, changes, fdtree
from cvmfs_graphdriver.changes import CHANGE_ADD, CHANGE_DELETE, CHANGE_MODIFY
from cvmfs_graphdriver.errors import UnsafeLayerError

# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, parts",
    [
        ("a", ["a"]),
        ("./a//b/", ["a", "b"]),
        ("a/./b", ["a", "b"]),
        (".", []),
        ("./", []),
        ("..a/b..", ["..a", "b.."]),
        (".wh..wh..opq", [".wh..wh..opq"]),
    ],
)
def test_split_member_name_normalises_safe_names(name, parts):
    assert archive.split_member_name(name) == parts


@pytest.mark.parametrize(
    "name, words",
    [
        ("/etc/passwd", "absolute path"),
        ("//x", "absolute path"),
        ("..", "'..'"),
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("a/b/..", "'..'"),
        ("./../x", "'..'"),
        ("a\x00b", "NUL"),
    ],
)
def test_split_member_name_refuses_escapes_and_names_the_entry(name, words):
    with pytest.raises(UnsafeLayerError) as e:
        archive.split_member_name(name)
    assert repr(name) in str(e.value)
    assert words in str(e.value)


def test_split_member_name_says_which_field_is_bad():
    with pytest.raises(UnsafeLayerError) as e:
        archive.split_member_name("../x", "hard link target")
    assert str(e.value).startswith("tar hard link target '../x'")


# ---------------------------------------------------------------------------- helpers


def _write(path, data: bytes = b"", mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _pairs(changes):
    out = [(c.path, c.kind) for c in changes]
    assert len(out) == len(set(out)), f"duplicate changes: {out}"
    return set(out)


# ---------------------------------------------------------------------------- size


def test_directory_size_counts_non_directories_and_hard_links_once(tmp_path):
    root = tmp_path / "root"
    _write(str(root / "a"), b"x" * 10)
    _write(str(root / "sub" / "deeper" / "b"), b"y" * 20)
    os.link(root / "a", root / "sub" / "a-again")
    os.symlink("target-of-11", root / "sub" / "sym")
    os.mkdir(root / "empty")
    assert fdtree.directory_size(str(root)) == 10 + 20 + len("target-of-11")


def test_directory_size_of_an_empty_tree_is_zero(tmp_path):
    assert fdtree.directory_size(str(tmp_path)) == 0


# ---------------------------------------------------------------------------- changes_dirs


@pytest.fixture
def old_and_new(tmp_path):
    old = tmp_path / "old"
    _write(str(old / "a" / "keep"), b"keep")
    _write(str(old / "a" / "mod"), b"before")
    _write(str(old / "a" / "gone"), b"gone")
    _write(str(old / "d" / "x"), b"x")
    _write(str(old / "d" / "sub" / "y"), b"y")
    _write(str(old / "same"), b"same")
    _write(str(old / "chm"), b"chm", 0o644)
    _write(str(old / "touched"), b"t")
    os.utime(old / "touched", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    new = tmp_path / "new"
    shutil.copytree(old, new, symlinks=True)  # copy2: same modes and mtimes
    return str(old), str(new)


def test_changes_dirs_of_identical_trees_is_empty(old_and_new):
    old, new = old_and_new
    assert changes.changes_dirs(new, old) == []


def test_changes_dirs_reports_exact_add_modify_delete(old_and_new):
    old, new = old_and_new
    with open(os.path.join(new, "a", "mod"), "wb") as f:
        f.write(b"after, and longer")
    os.unlink(os.path.join(new, "a", "gone"))
    _write(os.path.join(new, "a", "new"), b"new")
    shutil.rmtree(os.path.join(new, "d"))
    os.chmod(os.path.join(new, "chm"), 0o600)
    os.utime(os.path.join(new, "touched"),
             ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    _write(os.path.join(new, "n", "f"), b"f")

    found = changes.changes_dirs(new, old)
    assert _pairs(found) == {
        ("/a", CHANGE_MODIFY),
        ("/a/mod", CHANGE_MODIFY),
        ("/a/new", CHANGE_ADD),
        ("/a/gone", CHANGE_DELETE),
        ("/chm", CHANGE_MODIFY),
        ("/touched", CHANGE_MODIFY),
        ("/n", CHANGE_ADD),
        ("/n/f", CHANGE_ADD),
        ("/d", CHANGE_DELETE),  # a deleted directory is one change, not one per file
    }
    # a parent directory comes before the changes inside it (export order)
    paths = [c.path for c in found]
    assert paths.index("/a") < paths.index("/a/mod")
    assert paths.index("/n") < paths.index("/n/f")
    assert [c.to_json() for c in found if c.path == "/d"] == [{"Path": "/d", "Kind": 2}]


def test_changes_dirs_sees_a_file_replaced_by_a_directory(old_and_new):
    old, new = old_and_new
    os.unlink(os.path.join(new, "same"))
    _write(os.path.join(new, "same", "inner"), b"i")
    assert _pairs(changes.changes_dirs(new, old)) == {
        ("/same", CHANGE_MODIFY),
        ("/same/inner", CHANGE_ADD),
    }


def test_changes_dirs_against_nothing_adds_everything(old_and_new):
    _, new = old_and_new
    assert _pairs(changes.changes_dirs(new, None)) == {
        (p, CHANGE_ADD)
        for p in ("/a", "/a/keep", "/a/mod", "/a/gone", "/d", "/d/x", "/d/sub", "/d/sub/y",
                  "/same", "/chm", "/touched")
    }


def test_changes_size_counts_added_and_modified_files(old_and_new):
    old, new = old_and_new
    with open(os.path.join(new, "a", "mod"), "wb") as f:
        f.write(b"0123456789")
    _write(os.path.join(new, "n", "f"), b"abc")
    os.link(os.path.join(new, "n", "f"), os.path.join(new, "n", "f2"))
    os.unlink(os.path.join(new, "same"))
    assert changes.changes_size(new, old) == 10 + 3
