"""Helpers for the driver tests: layer tars built with tarfile, tree snapshots, and a
plugin-protocol client speaking HTTP/1.1 over a unix socket as dockerd does."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import secrets
import socket
import stat
import tarfile
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from cvmfs_graphdriver import mounts

T0 = 1_600_000_000  # a fixed whole-second mtime for tar entries


def new_id() -> str:
    """A cache id as dockerd makes them (64 hex digits)."""
    return secrets.token_hex(32)


# ---------------------------------------------------------------------------- tars


class TarBuilder:
    """Builds an uncompressed PAX layer tar in memory, one explicit entry at a time."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 (closed by bytes())
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape")

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: float,
              xattrs: Optional[Dict[str, bytes]], pax: Optional[Dict[str, str]]) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = mtime
        for key, value in (xattrs or {}).items():
            ti.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        ti.pax_headers.update(pax or {})
        return ti

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = T0,
            xattrs: Optional[Dict[str, bytes]] = None,
            pax: Optional[Dict[str, str]] = None) -> TarBuilder:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs, pax))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
             mtime: float = T0, xattrs: Optional[Dict[str, bytes]] = None,
             pax: Optional[Dict[str, str]] = None) -> TarBuilder:
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs, pax)
        ti.size = len(data)
        self._tar.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str, uid: int = 0, gid: int = 0,
                mtime: float = T0) -> TarBuilder:
        ti = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime, None, None)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def hardlink(self, name: str, target: str, mode: int = 0o644, uid: int = 0,
                 gid: int = 0, mtime: float = T0) -> TarBuilder:
        ti = self._info(name, tarfile.LNKTYPE, mode, uid, gid, mtime, None, None)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def fifo(self, name: str, mode: int = 0o600, mtime: float = T0) -> TarBuilder:
        self._tar.addfile(self._info(name, tarfile.FIFOTYPE, mode, 0, 0, mtime, None, None))
        return self

    def device(self, name: str, major: int, minor: int, *, block: bool = False,
               mode: int = 0o666, uid: int = 0, gid: int = 0, mtime: float = T0) -> TarBuilder:
        kind = tarfile.BLKTYPE if block else tarfile.CHRTYPE
        ti = self._info(name, kind, mode, uid, gid, mtime, None, None)
        ti.devmajor, ti.devminor = major, minor
        self._tar.addfile(ti)
        return self

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def read_tar(data: bytes) -> Dict[str, Tuple[tarfile.TarInfo, bytes]]:
    """name (no trailing '/') -> (member, content) of a tar stream."""
    out: Dict[str, Tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", errors="surrogateescape") as tf:
        for m in tf:
            content = b""
            if m.isreg():
                f = tf.extractfile(m)
                content = f.read() if f else b""
            out[m.name.rstrip("/")] = (m, content)
    return out


# ---------------------------------------------------------------------------- trees


def snapshot(root: str, skip: Iterable[str] = (),
             ignore_mtime: Iterable[str] = ()) -> Dict[str, Tuple[Any, ...]]:
    """Everything a change outside the layer would alter: type, mode, owner, size, mtime,
    link count, link target, content hash and xattrs of every entry below `root`.

    `skip`: absolute paths left out (with their subtrees); `ignore_mtime`: directories the
    driver itself writes into (their own mtime is not compared, their entries are)."""
    skipped = {os.path.normpath(p) for p in skip}
    no_mtime = {os.path.normpath(p) for p in ignore_mtime}
    out: Dict[str, Tuple[Any, ...]] = {}

    def rec(path: str) -> None:
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if full in skipped:
                continue
            st = os.lstat(full)
            extra: Any = ""
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            try:
                xattrs = tuple(sorted(os.listxattr(full, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            mtime = None if full in no_mtime else st.st_mtime_ns
            out[os.path.relpath(full, root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None, mtime, st.st_nlink,
                st.st_rdev, extra, xattrs,
            )
            if stat.S_ISDIR(st.st_mode):
                rec(full)

    rec(root)
    return out


def view_manifest(root: str) -> Dict[str, Tuple[Any, ...]]:
    """What a container sees in a mounted layer: type, mode, owner, content, link target."""
    out: Dict[str, Tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    extra = f.read()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            out["/" + os.path.relpath(full, root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra,
            )
    return out


def mounts_below(path: str) -> List[str]:
    return mounts.mounts_under(os.path.realpath(path))


# ---------------------------------------------------------------------------- protocol client


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class PluginError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class PluginClient:
    """Talks to the plugin like dockerd's plugin client: one keep-alive connection."""

    ACCEPT = "application/vnd.docker.plugins.v1.2+json"

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = UnixHTTPConnection(path)

    def close(self) -> None:
        self.conn.close()

    def _finish(self, resp: http.client.HTTPResponse) -> Dict[str, Any]:
        raw = resp.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise PluginError(resp.status, raw.decode(errors="replace")) from None
        if resp.status != 200 or body.get("Err"):
            raise PluginError(resp.status, body.get("Err") or raw.decode(errors="replace"))
        return body

    def call(self, method: str, body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        data = (json.dumps(body or {}) + "\n").encode()
        self.conn.request("POST", f"/{method}", body=data,
                          headers={"Accept": self.ACCEPT, "Content-Type": "application/json",
                                   "Content-Length": str(len(data))})
        return self._finish(self.conn.getresponse())

    def apply_diff(self, layer: str, parent: str, data: bytes,
                   chunk: int = 32 * 1024) -> Dict[str, Any]:
        def chunks() -> Iterator[bytes]:
            for i in range(0, len(data), chunk):
                yield data[i : i + chunk]

        # No Content-Length and an iterable body: http.client sends
        # "Transfer-Encoding: chunked", as dockerd does for ApplyDiff.
        self.conn.request("POST", f"/GraphDriver.ApplyDiff?id={layer}&parent={parent}",
                          body=chunks(), headers={"Accept": self.ACCEPT,
                                                  "Content-Type": "application/x-tar"},
                          encode_chunked=True)
        return self._finish(self.conn.getresponse())

    def diff(self, layer: str, parent: str = "") -> Tuple[bytes, http.client.HTTPResponse]:
        data = (json.dumps({"ID": layer, "Parent": parent}) + "\n").encode()
        self.conn.request("POST", "/GraphDriver.Diff", body=data,
                          headers={"Accept": self.ACCEPT, "Content-Length": str(len(data))})
        resp = self.conn.getresponse()
        if resp.getheader("Content-Type", "").startswith("application/vnd.docker"):
            self._finish(resp)  # an error answered as JSON
        return resp.read(), resp


# ---------------------------------------------------------------------------- driver shortcuts


def apply(driver: Any, layer: str, parent: str, data: bytes) -> int:
    return driver.apply_diff(layer, parent, io.BytesIO(data))


def make_layer(driver: Any, parent: str = "", data: Optional[bytes] = None, *,
               rw: bool = False, layer: str = "") -> str:
    """Create a layer as dockerd does on pull (Create, then ApplyDiff of its tar)."""
    layer = layer or new_id()
    driver.create(layer, parent, "", None, read_write=rw)
    if data is not None:
        apply(driver, layer, parent, data)
    return layer


def xattr(path: str, name: str) -> Optional[bytes]:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None
