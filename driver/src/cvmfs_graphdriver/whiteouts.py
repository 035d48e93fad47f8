"""Whiteouts: how a layer says "deleted here" and "this directory starts empty".

One fact with several representations; every one of them lives in this module (as
moby keeps the names in pkg/archive/whiteouts.go and one converter per target in
archive_linux.go). No other module spells a marker name or an overlay xattr.

    layer tars (OCI/AUFS)       .wh.NAME        NAME is deleted from the layers below
                                .wh..wh..opq    the directory hides all it had below
                                .wh..wh.*       other AUFS bookkeeping: ignored
    an overlay upper dir        NAME as a 0:0 character device; the directory with
                                trusted.overlay.opaque=y
    a published layer store     the marker files themselves, as `cvmfs_server ingest`
                                and DUCC keep them, listed in a LayerMarkers index
    a flattened tree            the deletions carried out

Converters, one per target:
- reading a tar: `OverlayUpper` (a graph-driver layer), `Flatten` (one tree from many
  layers); a layer store keeps markers as plain files (no converter);
- writing a tar: `overlay_to_tar` (an upper dir back to markers, moby's ConvertWrite).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from typing import Collection, Iterable, List, Optional, Set, Tuple, Union

from . import fdtree
from .errors import UnsafeLayerError
from .tarformat import REG, Header

PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"

OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"
REDIRECT_XATTR = "trusted.overlay.redirect"

DELETE, OPAQUE, META = "delete", "opaque", "meta"


class WhiteoutError(ValueError):
    """A marker name that names nothing (".wh.", ".wh..", ".wh...")."""


@dataclass(frozen=True)
class Marker:
    kind: str  # DELETE, OPAQUE or META
    target: str = ""  # the name a DELETE marker deletes


# ---------------------------------------------------------------------------- names


def classify(base: str) -> Optional[Marker]:
    """What the last component of a tar member name means (None: an ordinary entry)."""
    if not base.startswith(PREFIX):
        return None
    if base == OPAQUE_MARKER:
        return Marker(OPAQUE)
    if base.startswith(META_PREFIX):
        return Marker(META)
    target = base[len(PREFIX):]
    if target in ("", ".", ".."):
        raise WhiteoutError(f"{base!r} is a whiteout of an invalid name")
    return Marker(DELETE, target)


def _join(parent: str, base: str) -> str:
    return f"{parent}/{base}" if parent else base


def marker_path(deleted: str) -> str:
    """The marker of a deleted relative path: "a/b" -> "a/.wh.b"."""
    parent, _, base = deleted.rpartition("/")
    return _join(parent, PREFIX + base)


def opaque_marker_path(directory: str) -> str:
    """The marker that makes a directory opaque ("" is the layer root)."""
    return _join(directory, OPAQUE_MARKER)


def is_overlay_xattr(name: str) -> bool:
    """overlayfs's own attributes: only the driver sets them, never a layer tar."""
    return name.startswith(OVERLAY_XATTR_PREFIX)


# ---------------------------------------------------------------------------- overlay form


def is_whiteout(st: os.stat_result) -> bool:
    """overlayfs's whiteout: a character device 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout(name: str, *, dir_fd: Optional[int] = None, uid: int = 0,
                  gid: int = 0) -> None:
    os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dir_fd)
    if uid or gid:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def set_opaque(target: Union[str, int]) -> None:
    """Mark a directory (a path, or an open directory fd) opaque for overlayfs."""
    os.setxattr(target, OPAQUE_XATTR, b"y")


def is_opaque(target: Union[str, int]) -> bool:
    """Whether a directory (a path, never followed if a symlink, or an fd) is opaque."""
    try:
        if isinstance(target, int):
            value = os.getxattr(target, OPAQUE_XATTR)
        else:
            value = os.getxattr(target, OPAQUE_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return False
        raise
    return value == b"y"


# ---------------------------------------------------------------------------- tar -> tree


class OverlayUpper:
    """Markers become overlayfs whiteouts and opaque directories (a layer's diff dir)."""

    def apply(self, parent_fd: int, parent: str, marker: Marker, uid: int, gid: int) -> None:
        if marker.kind == OPAQUE:
            set_opaque(parent_fd)
        elif marker.kind == DELETE:
            fdtree.remove_at(parent_fd, marker.target)
            make_whiteout(marker.target, dir_fd=parent_fd, uid=uid, gid=gid)


def _dir_entries(dir_fd: int) -> List[os.DirEntry]:
    """A directory's entries by name, types from readdir (no stat, nothing opened)."""
    with os.scandir(dir_fd) as it:
        return sorted(it, key=lambda e: e.name)


class Flatten:
    """Markers delete what they name from the tree built so far (flattening layers).

    `written` collects the entries of the tar being applied: an opaque marker keeps
    those and deletes what earlier layers left in the directory.
    """

    def __init__(self) -> None:
        self.written: Set[str] = set()

    def apply(self, parent_fd: int, parent: str, marker: Marker, uid: int, gid: int) -> None:
        if marker.kind == OPAQUE:
            for child in os.listdir(parent_fd):
                if _join(parent, child) not in self.written:
                    fdtree.remove_at(parent_fd, child)
        elif marker.kind == DELETE:
            fdtree.remove_at(parent_fd, marker.target)

    def wrote(self, parts: List[str]) -> None:
        self.written.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))


Converter = Union[OverlayUpper, Flatten]


def apply_marker(converter: Optional[Converter], parent_fd: int, parts: List[str],
                 uid: int, gid: int) -> bool:
    """Handle a tar member that may be a marker; False if it is to be written as is.

    Without a converter (a layer store), markers are kept as the plain files they are.
    """
    if converter is None:
        return False
    try:
        marker = classify(parts[-1])
    except WhiteoutError as e:
        raise UnsafeLayerError(f"tar entry {'/'.join(parts)!r}: {e}") from None
    if marker is None:
        return False
    converter.apply(parent_fd, "/".join(parts[:-1]), marker, uid, gid)
    return True


# ---------------------------------------------------------------------------- tree -> tar


def overlay_to_tar(h: Header, st: os.stat_result,
                   opaque: bool) -> Tuple[Header, Optional[Header]]:
    """moby's overlayWhiteoutConverter.ConvertWrite: a whiteout device becomes its marker
    file; an opaque directory is followed by an opaque marker.

    As moby: the device keeps its owner and mtime (and a hard-link target, if it was one
    of the shared whiteout inodes the kernel links); the opaque marker takes the
    directory's permission bits and owner and no mtime.
    """
    if is_whiteout(st):
        parent, _, base = h.name.rpartition(b"/")
        h.name = (parent + b"/" if parent else b"") + os.fsencode(PREFIX) + base
        h.mode, h.typeflag, h.size = 0o600, REG, 0
    if opaque and stat.S_ISDIR(st.st_mode):
        return h, Header(
            name=h.name.rstrip(b"/") + b"/" + os.fsencode(OPAQUE_MARKER),
            typeflag=REG, mode=h.mode & 0o777, uid=h.uid, gid=h.gid,
            uname=h.uname, gname=h.gname,
        )
    return h, None


def deletion_header(path: str, mtime: int) -> Header:
    """The marker moby's ExportChanges writes for a deleted path (mode 0, root-owned)."""
    return Header(name=os.fsencode(marker_path(path.lstrip("/"))), typeflag=REG,
                  mtime=mtime)


# ---------------------------------------------------------------------------- layer stores


@dataclass
class LayerMarkers:
    """The markers of one published layer (paths relative, '/'-separated)."""

    markers: List[str]  # files the mask above hides: every marker, CVMFS bookkeeping
    deleted: List[str]  # paths the layer deletes from below
    opaque: List[str]  # directories the layer makes opaque ("" is the root)

    def to_json(self) -> str:
        return json.dumps({"markers": self.markers, "deleted": self.deleted,
                           "opaque": self.opaque})

    @classmethod
    def from_json(cls, text: str) -> LayerMarkers:
        doc = json.loads(text)
        return cls(list(doc["markers"]), list(doc["deleted"]), list(doc["opaque"]))

    @property
    def empty(self) -> bool:
        return not self.markers

    def add(self, parent: str, base: str) -> None:
        """Record `base` in directory `parent` if it is a marker."""
        try:
            marker = classify(base)
        except WhiteoutError:
            marker = Marker(META)  # names nothing: hidden, deletes nothing
        if marker is None:
            return
        self.markers.append(_join(parent, base))
        if marker.kind == OPAQUE:
            self.opaque.append(parent)
        elif marker.kind == DELETE:
            self.deleted.append(_join(parent, marker.target))

    @classmethod
    def from_names(cls, names: Iterable[List[str]]) -> LayerMarkers:
        """From the split member names of a layer tar."""
        out = cls([], [], [])
        for parts in names:
            if parts:
                out.add("/".join(parts[:-1]), parts[-1])
        out.markers.sort()
        return out

    @classmethod
    def scan(cls, layer_dir: str, also_hide: Collection[str] = ()) -> LayerMarkers:
        """From a published layer directory, by listing directories only (no file is
        opened: on CVMFS that would fetch it). Files named in `also_hide` (bookkeeping of
        the layer store) are to be hidden too."""
        out = cls([], [], [])
        root_fd = os.open(layer_dir, fdtree.DIR_FLAGS)
        try:
            with fdtree.DirStack(root_fd) as stack:
                pending = [iter(_dir_entries(stack.fd))]
                while pending:
                    entry = next(pending[-1], None)
                    if entry is None:
                        pending.pop()
                        if pending:
                            stack.pop()
                        continue
                    rel = "/".join(stack.names)
                    if entry.name.startswith(PREFIX):
                        out.add(rel, entry.name)
                    elif entry.name in also_hide and not entry.is_dir(follow_symlinks=False):
                        out.markers.append(_join(rel, entry.name))
                    elif entry.is_dir(follow_symlinks=False):
                        stack.push(entry.name)
                        pending.append(iter(_dir_entries(stack.fd)))
        finally:
            os.close(root_fd)
        out.markers.sort()
        return out
