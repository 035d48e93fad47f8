"""Fuzzing the diff writer (archive.write_layer_tar, tarformat) and changes.changes_dirs
on trees hypothesis makes: directories, files, symlinks, hard links, FIFOs, devices,
overlay whiteouts (0:0 character devices) and opaque directories
(trusted.overlay.opaque=y), with owners, modes, whole-second mtimes and
security.capability.

Properties: a diff dir written as a layer tar and applied (OverlayUpper) into a fresh
directory gives the same tree - names, types, modes, owners, mtimes, symlink targets,
device numbers, hard links, the xattrs tarformat keeps, whiteouts and opaque
directories; changes_dirs between two trees is what a simple model of moby's
ChangesDirs says.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tempfile
from typing import Dict, List, Tuple

import pytest
from fuzzkit import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_graphdriver import archive, changes, whiteouts

pytestmark = pytest.mark.root

NAMES = ["a", "b", "c", "é", "x" * 110, "\udcff", "sp ace", "n" * 255]
CAP_V2 = bytes([0, 0, 0, 2]) + bytes(range(16))  # vfs_cap_data revision 2
T = 1_600_000_000


@st.composite
def trees(draw: st.DrawFn, max_entries: int = 10) -> Dict[str, dict]:
    """path -> spec; parents always directories listed before their children."""
    spec: Dict[str, dict] = {}
    dirs = [""]
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(st.sampled_from(NAMES))}".lstrip("/")
        if path in spec or len(os.fsencode(path)) > 600:
            continue
        kind = draw(st.sampled_from(["dir", "dir", "file", "file", "symlink", "hardlink",
                                     "fifo", "chr", "blk", "whiteout"]))
        files = [p for p, s in spec.items() if s["kind"] == "file"]
        if kind == "whiteout" and len(os.fsencode(path.rpartition("/")[2])) > 251:
            # Its marker, ".wh." + the name, is longer than NAME_MAX and apply_tar refuses
            # it: test_fuzz_found.py's strict xfail keeps that bug; here, a plain file.
            kind = "file"
        if kind == "hardlink" and not files:
            kind = "file"
        e = {"kind": kind, "mode": draw(st.sampled_from([0o755, 0o644, 0o4755, 0o1777,
                                                          0o000, 0o2711])),
             "uid": draw(st.sampled_from([0, 1000, 2**21])),
             "gid": draw(st.sampled_from([0, 100, 70000])),
             "mtime": draw(st.sampled_from([T, 0, -86400, 2**33 + 1, T + 7]))}
        if kind == "file":
            e["data"] = draw(st.binary(max_size=40)) * draw(st.sampled_from([1, 50]))
            e["cap"] = draw(st.booleans()) and draw(st.booleans())
        elif kind == "symlink":
            e["target"] = draw(st.sampled_from(["a", "../b", "/etc/passwd", "é/\udcff",
                                                "t" * 200, "."]))
        elif kind == "hardlink":
            e["target"] = draw(st.sampled_from(files))
        elif kind in ("chr", "blk"):
            e["dev"] = (draw(st.sampled_from([1, 7, 4095])),
                        draw(st.sampled_from([0, 3, 2**20 - 1])))
        elif kind == "dir":
            e["opaque"] = draw(st.booleans()) and draw(st.booleans())
            dirs.append(path)
        spec[path] = e
    return spec


def build(root: str, spec: Dict[str, dict]) -> None:
    for path, e in spec.items():
        full = os.path.join(root, path)
        kind = e["kind"]
        if kind == "dir":
            os.mkdir(full)
            if e["opaque"]:
                whiteouts.set_opaque(full)
        elif kind == "file":
            with open(full, "wb") as f:
                f.write(e["data"])
        elif kind == "symlink":
            os.symlink(e["target"], full)
        elif kind == "hardlink":
            os.link(os.path.join(root, e["target"]), full)
            continue  # shares its target's metadata
        elif kind == "fifo":
            os.mkfifo(full)
        elif kind == "whiteout":
            whiteouts.make_whiteout(full, uid=e["uid"], gid=e["gid"])
            continue  # as the driver makes them: mode 0, its owner (its mtime below)
        else:
            os.mknod(full, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o600,
                     os.makedev(*e["dev"]))
        os.chown(full, e["uid"], e["gid"], follow_symlinks=False)
        if kind != "symlink":
            os.chmod(full, e["mode"])
        if e.get("cap"):
            os.setxattr(full, "security.capability", CAP_V2)
    for path, e in sorted(spec.items(), key=lambda kv: -kv[0].count("/")):  # dirs last
        if e["kind"] != "hardlink":
            os.utime(os.path.join(root, path), ns=(e["mtime"] * 10**9, e["mtime"] * 10**9),
                     follow_symlinks=False)


def describe(root: str) -> Dict[str, tuple]:
    """Everything the round trip keeps, per path; hard links as the set of their names."""
    out: Dict[str, tuple] = {}
    inodes: Dict[int, List[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            s = os.lstat(full)
            inodes.setdefault(s.st_ino, []).append(rel)
            mode = stat.S_IMODE(s.st_mode)
            extra: object = None
            if stat.S_ISREG(s.st_mode):
                with open(full, "rb") as f:
                    extra = f.read()
            elif stat.S_ISLNK(s.st_mode):
                extra, mode = os.readlink(full), None
            elif stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
                extra = s.st_rdev
            mtime = None if whiteouts.is_whiteout(s) else s.st_mtime_ns
            cap = None
            if not stat.S_ISLNK(s.st_mode):
                with contextlib.suppress(OSError):
                    cap = os.getxattr(full, "security.capability", follow_symlinks=False)
            opaque = stat.S_ISDIR(s.st_mode) and whiteouts.is_opaque(full)
            out[rel] = (stat.S_IFMT(s.st_mode), mode, s.st_uid, s.st_gid, mtime, extra, cap,
                        opaque)
    for names in inodes.values():
        for n in names:
            out[n] = out[n] + (tuple(sorted(names)),)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("trees"))


@settings(max_examples=examples(120))
@given(spec=trees())
def test_write_layer_tar_then_apply_tar_gives_the_same_tree(base, spec):
    work = tempfile.mkdtemp(dir=base)
    try:
        src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
        os.mkdir(src)
        os.mkdir(dst)
        build(src, spec)
        out = io.BytesIO()
        archive.write_layer_tar(out, src)
        archive.apply_tar(io.BytesIO(out.getvalue()), dst, whiteouts.OverlayUpper())
        assert describe(dst) == describe(src)
        # and the tar of the copy is the same tar, byte for byte (a reproducible diff) -
        # unless it holds whiteouts: a marker's mtime is not kept (moby's ConvertRead
        # makes the device without it too), so the copy's markers carry other times.
        if not any(e["kind"] == "whiteout" for e in spec.values()):
            again = io.BytesIO()
            archive.write_layer_tar(again, dst)
            assert again.getvalue() == out.getvalue()
    finally:
        shutil.rmtree(work)


# ---------------------------------------------------------------------------- changes


def model_changes(old: Dict[str, dict], new: Dict[str, dict]) -> List[Tuple[str, int]]:
    """moby's ChangesDirs, from the specs: an entry only in the new tree is added (and
    all below it); in both, modified if its type, mode, owner or device differ or, for
    a non-directory, its mtime or size (or its capability); in the old only, deleted - if
    its parent is a directory on both sides; a directory with a change below it that is
    not itself added or modified is modified."""
    def meta(specs: Dict[str, dict], path: str) -> tuple:
        e = specs[path]
        if e["kind"] == "hardlink":
            e = dict(specs[e["target"]], kind="file")
        kind = e["kind"]
        mode = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
                "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK,
                "whiteout": stat.S_IFCHR}[kind]
        perm = 0o777 if kind == "symlink" else 0 if kind == "whiteout" else e["mode"]
        rdev = os.makedev(*e["dev"]) if kind in ("chr", "blk") else 0
        size = (len(e["data"]) if kind == "file" else
                len(os.fsencode(e["target"])) if kind == "symlink" else 0)
        mtime = e["mtime"]
        owner = (e["uid"], e["gid"])
        exempt = kind in ("dir", "blk")  # moby: mode & S_IFDIR == S_IFDIR
        return ((mode | perm, owner, rdev), None if exempt else (mtime, size),
                bool(e.get("cap")))

    def is_dir(specs: Dict[str, dict], path: str) -> bool:
        return path == "" or (path in specs and specs[path]["kind"] == "dir")

    out = set()
    added = {p for p in new if _added(old, new, p)}
    for p in added:
        out.add(("/" + p, changes.CHANGE_ADD))
    modified = {p for p in new if p not in added and meta(old, p) != meta(new, p)}
    for p in modified:
        out.add(("/" + p, changes.CHANGE_MODIFY))
    deleted = {p for p in old if p not in new and is_dir(old, p.rpartition("/")[0])
               and is_dir(new, p.rpartition("/")[0])
               and not _added(old, new, p.rpartition("/")[0])}
    for p in deleted:
        out.add(("/" + p, changes.CHANGE_DELETE))
    for p in added | modified | deleted:
        parent = p.rpartition("/")[0]
        while parent and parent not in added and parent not in modified:
            out.add(("/" + parent, changes.CHANGE_MODIFY))
            parent = parent.rpartition("/")[0]
    return sorted(out)


def _added(old: Dict[str, dict], new: Dict[str, dict], path: str) -> bool:
    """Added: not in the old tree, or below a path that is no directory there."""
    if path == "":
        return False
    parent = path.rpartition("/")[0]
    if _added(old, new, parent):
        return True
    return path not in old or (parent != "" and old[parent]["kind"] != "dir")


@st.composite
def tree_pairs(draw: st.DrawFn) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    old = draw(trees(8))
    new = {p: dict(e) for p, e in old.items()}
    for path in list(new):
        if path not in new:
            continue
        op = draw(st.sampled_from(["keep", "keep", "keep", "delete", "chmod", "chown",
                                   "touch", "retype", "grow"]))
        e = new[path]
        if op == "delete" or (e["kind"] == "file" and any(
                x.get("target") == path for x in new.values())):
            if op == "delete":
                for p in [p for p in new if p == path or p.startswith(path + "/")
                          or new[p].get("target") == path and new[p]["kind"] == "hardlink"]:
                    del new[p]
            continue
        if e["kind"] == "hardlink":
            continue
        if op == "chmod" and e["kind"] not in ("symlink", "whiteout"):
            e["mode"] ^= 0o020
        elif op == "chown":
            e["uid"] += 1
        elif op == "touch" and e["kind"] != "whiteout":
            e["mtime"] += 1
        elif op == "grow" and e["kind"] == "file":
            e["data"] += b"+"
        elif op == "retype" and not any(p.startswith(path + "/") for p in new):
            new[path] = {"kind": "fifo", "mode": 0o644, "uid": 0, "gid": 0, "mtime": T}
    extra = draw(trees(4))
    for path, e in extra.items():
        parent = path.rpartition("/")[0]
        if path not in new and (parent == "" or new.get(parent, {}).get("kind") == "dir") \
                and e["kind"] != "hardlink":
            new[path] = e
    return old, new


@settings(max_examples=examples(120))
@given(pair=tree_pairs())
def test_changes_dirs_agrees_with_a_model(base, pair):
    old, new = pair
    work = tempfile.mkdtemp(dir=base)
    try:
        o, n = os.path.join(work, "old"), os.path.join(work, "new")
        os.mkdir(o)
        os.mkdir(n)
        build(o, old)
        build(n, new)
        got = sorted((c.path, c.kind) for c in changes.changes_dirs(n, o))
        assert len(got) == len(set(got)), "a change listed twice"
        assert got == model_changes(old, new)
    finally:
        shutil.rmtree(work)
