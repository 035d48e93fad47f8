"""Layer stores: where unpacked layers are published (DUCC's layout).

    .layers/<hex[0:2]>/<hex>/layerfs/                  one unpacked layer
    .layers/<hex[0:2]>/<hex>/.metadata/whiteouts.json  its `.wh.` markers (for the driver)
    .layers/<hex[0:2]>/<hex>/.metadata/origin.json     which image first published it,
                                                       and the layer's uncompressed digest
    .flat/<hex[0:2]>/<hex>/                            a whole image flattened

`dir:PATH` writes into a directory that has the layout of a repository (a CVMFS
publisher's tree, a test tree, a shared filesystem). Each layer is unpacked into a
partial directory and renamed into place, so a layer is either complete or absent.

`cvmfs:REPO` streams each layer into `cvmfs_server ingest --tar_file -`, which publishes
it in its own transaction (all or nothing), on a CVMFS publisher node.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from typing import IO, Callable, ContextManager, List, Optional

from .. import archive, mounts, thin, whiteouts
from ..errors import DriverError


class PublishError(Exception):
    """A failure of the publishing tool; the message says what to do."""


# DUCC's repository layout (the paths live in thin.py: the driver reads them too).
layer_dir = thin.layer_path
flat_dir = thin.flat_path


def metadata_files(markers: whiteouts.LayerMarkers, origin: str, diff_id: str) -> dict:
    """The layer's .metadata/ files: its markers, and where it came from with its verified
    uncompressed digest (lazy pulls check it against the chain ID containerd asks for)."""
    return {
        thin.WHITEOUT_INDEX: markers.to_json() + "\n",
        thin.ORIGIN_FILE: json.dumps({"origin": origin, "diff_id": diff_id,
                                      "published": int(time.time()),
                                      "tool": "cvmfs-thin"}) + "\n",
    }


Opener = Callable[[], ContextManager[IO[bytes]]]


class Store:
    """Where layers go. `repo` is the repository name thin descriptors refer to."""

    def __init__(self, repo: str) -> None:
        self.repo = repo

    def has(self, rel: str) -> bool:
        raise NotImplementedError

    def publish_layer(self, rel: str, open_tar: Opener, markers: whiteouts.LayerMarkers,
                      origin: str, diff_id: str) -> None:
        raise NotImplementedError

    def scratch_tree(self, rel: str, workdir: Optional[str]) -> str:
        """An empty directory to build the tree that publish_tree(rel, ...) takes."""
        return tempfile.mkdtemp(prefix="cvmfs-thin-tree-", dir=workdir)

    def publish_tree(self, rel: str, tree: str) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class DirStore(Store):
    def __init__(self, root: str, repo: str) -> None:
        super().__init__(repo)
        self.root = os.path.abspath(root)

    def describe(self) -> str:
        return f"dir:{self.root}"

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def has(self, rel: str) -> bool:
        return os.path.isdir(self._path(rel))

    def _partial(self, final: str) -> str:
        parent, name = os.path.split(final)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        # Partial directories of runs that died are swept when the same layer comes again
        # (not those of a run still going on this machine).
        for old in os.listdir(parent):
            if old.startswith(f".{name}.partial-") and not _alive(old.rsplit("-", 1)[-1]):
                shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
        tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
        os.mkdir(tmp, 0o755)
        return tmp

    def _commit(self, tmp: str, final: str) -> None:
        mounts.syncfs(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if os.path.isdir(final):  # published meanwhile by another run: same content
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise

    def publish_layer(self, rel: str, open_tar: Opener, markers: whiteouts.LayerMarkers,
                      origin: str, diff_id: str) -> None:
        final = os.path.dirname(self._path(rel))  # .layers/xx/hex
        tmp = self._partial(final)
        try:
            fs = os.path.join(tmp, os.path.basename(rel))
            os.mkdir(fs, 0o755)
            with open_tar() as stream:  # markers stay plain files, as DUCC keeps them
                archive.apply_tar(stream, fs, converter=None)
            meta = os.path.join(tmp, thin.METADATA_DIR)
            os.mkdir(meta, 0o755)
            for name, content in metadata_files(markers, origin, diff_id).items():
                with open(os.path.join(meta, name), "w", encoding="utf-8") as f:
                    f.write(content)
            self._commit(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def scratch_tree(self, rel: str, workdir: Optional[str]) -> str:
        # In the store itself: the finished tree is renamed into place.
        return self._partial(self._path(rel))

    def publish_tree(self, rel: str, tree: str) -> None:
        final = self._path(rel)
        os.makedirs(os.path.dirname(final), mode=0o755, exist_ok=True)
        self._commit(tree, final)


class CvmfsStore(Store):
    """Publishes with `cvmfs_server ingest` on a CVMFS publisher (stratum 0) node."""

    def __init__(self, repo: str, cvmfs_root: str = "/cvmfs",
                 cvmfs_server: Optional[str] = None) -> None:
        super().__init__(repo)
        self.cvmfs_root = cvmfs_root
        self.cvmfs_server = cvmfs_server or os.environ.get("CVMFS_SERVER", "cvmfs_server")

    def describe(self) -> str:
        return f"cvmfs:{self.repo}"

    def has(self, rel: str) -> bool:
        return os.path.isdir(os.path.join(self.cvmfs_root, self.repo, rel))

    def ingest_command(self, base_dir: str, catalog: bool) -> List[str]:
        cmd = [self.cvmfs_server, "ingest", "--tar_file", "-", "--base_dir", base_dir]
        if catalog:
            cmd.append("--catalog")
        cmd.append(self.repo)
        return cmd

    def _ingest(self, base_dir: str, feed: Callable[[IO[bytes]], None], catalog: bool) -> None:
        cmd = self.ingest_command(base_dir, catalog)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise PublishError(
                f"{self.cvmfs_server} not found: the cvmfs: store runs on a CVMFS publisher "
                "node (package cvmfs-server); elsewhere use --store dir:PATH"
            ) from None
        assert proc.stdin is not None and proc.stdout is not None
        try:
            feed(proc.stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        output = proc.stdout.read().decode(errors="replace")
        if proc.wait() != 0:
            raise PublishError(
                f"`{' '.join(cmd)}` failed with exit code {proc.returncode} (the transaction "
                f"was not published):\n{output.strip()}"
            )

    def publish_layer(self, rel: str, open_tar: Opener, markers: whiteouts.LayerMarkers,
                      origin: str, diff_id: str) -> None:
        base = os.path.dirname(rel)
        # Metadata first: the layer directory appearing is what marks a layer complete.
        meta = io.BytesIO()
        with tarfile.open(fileobj=meta, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, content in metadata_files(markers, origin, diff_id).items():
                data = content.encode()
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, int(time.time())
                tf.addfile(ti, io.BytesIO(data))
        self._ingest(f"{base}/{thin.METADATA_DIR}",
                     lambda out: _write_all(out, meta.getvalue()), False)

        def feed(out: IO[bytes]) -> None:
            with open_tar() as stream:
                shutil.copyfileobj(stream, out, 1 << 20)

        self._ingest(rel, feed, True)

    def publish_tree(self, rel: str, tree: str) -> None:
        def feed(out: IO[bytes]) -> None:
            archive.write_layer_tar(out, tree)  # a plain tar: the tree has no whiteouts

        try:
            self._ingest(rel, feed, True)
        finally:
            shutil.rmtree(tree, ignore_errors=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_all(out: IO[bytes], data: bytes) -> None:
    out.write(data)


def parse_store(spec: str, repo: Optional[str], cvmfs_root: str) -> Store:
    kind, _, value = spec.partition(":")
    if kind == "dir" and value:
        if not repo:
            raise PublishError("--repo is required with a dir: store (the repository name "
                               "nodes will see the store under, e.g. unpacked.example.org)")
        return DirStore(value, repo)
    if kind == "cvmfs" and value:
        if repo and repo != value:
            raise PublishError(f"--repo {repo} differs from the store's repository {value}")
        return CvmfsStore(value, cvmfs_root)
    raise PublishError(f"unknown store {spec!r}: use dir:PATH or cvmfs:REPOSITORY")


def check_repo_name(repo: str) -> str:
    try:
        return thin.check_repository_name(repo)
    except DriverError as e:
        raise PublishError(str(e)) from None
