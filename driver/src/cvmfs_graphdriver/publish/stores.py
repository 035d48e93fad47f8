"""Layer stores: where unpacked layers are published (DUCC's layout).

    .layers/<hex[0:2]>/<hex>/layerfs/                  one unpacked layer
    .layers/<hex[0:2]>/<hex>/.metadata/whiteouts.json  its `.wh.` markers (for the driver)
    .layers/<hex[0:2]>/<hex>/.metadata/origin.json     which image first published it,
                                                       and the layer's uncompressed digest
    .flat/<hex[0:2]>/<hex>/                            a whole image flattened
    .cvmfs-thin/images/<sha256 of name>.json           which images use which layers
                                                       (records.py; for `gc`)
    .cvmfs-thin/cvmfs-thin.lock                        dir: stores: publishers share it,
                                                       gc holds it alone (STORE_DIR,
                                                       LOCK_FILE)

`dir:PATH` writes into a directory that has the layout of a repository (a CVMFS
publisher's tree, a test tree, a shared filesystem). Each layer is unpacked into a
partial directory and renamed into place, so a layer is either complete or absent.

`cvmfs:REPO` streams each layer into `cvmfs_server ingest --tar_file -`, which publishes
it in its own transaction (all or nothing), on a CVMFS publisher node.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import IO, Callable, ContextManager, Dict, Iterator, List, Optional

from .. import archive, fdtree, mounts, thin, whiteouts
from ..errors import DriverError
from . import progress as _progress


class PublishError(Exception):
    """A failure of the publishing tool; the message says what to do."""


# A CVMFS publisher's per-repository spool directory (cvmfs_server's CVMFS_SPOOL_DIR),
# where cvmfs-thin keeps its lock and the note that it opened a transaction.
CVMFS_SPOOL = "/var/spool/cvmfs"
LOCK_FILE = "cvmfs-thin.lock"
# cvmfs-thin's own directory in a store (its image records; a dir: store's lock).
STORE_DIR = ".cvmfs-thin"
TRANSACTION_OWNER = "cvmfs-thin.transaction"
ABORT_TIMEOUT = 300

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

    def session(self, exclusive: bool = False) -> ContextManager[None]:
        """Around a run's publishing (and the records it writes): what the store needs
        held (a lock) or recovered. `exclusive`: no publisher may run meanwhile (gc)."""
        raise NotImplementedError

    def record_lock(self, record: str, image: str) -> ContextManager[None]:
        """Held from reading an image's record `record` until its new one is written, so
        two runs publishing the same image one after the other, never interleaved (the
        later would release what the earlier's pushed image uses). A store whose session
        is exclusive already needs nothing more."""
        return contextlib.nullcontext()

    def view(self, rel: str) -> str:
        """Where `rel` of the store can be read on this machine."""
        raise NotImplementedError

    def read(self, rel: str, limit: int) -> Optional[bytes]:
        """A small file of the store (None when absent)."""
        try:
            with open(self.view(rel), "rb") as f:
                return f.read(limit + 1)
        except FileNotFoundError:
            return None

    def listdir(self, rel: str) -> List[str]:
        try:
            return sorted(os.listdir(self.view(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def commit(self, writes: Dict[str, bytes], deletes: List[str]) -> None:
        """Delete the directories or files `deletes`, then write the small files
        `writes`, each all or nothing (inside a session)."""
        raise NotImplementedError


class DirStore(Store):
    def __init__(self, root: str, repo: str, wait: float = 0.0) -> None:
        super().__init__(repo)
        self.root = os.path.abspath(root)
        self.wait = wait

    def describe(self) -> str:
        return f"dir:{self.root}"

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def view(self, rel: str) -> str:
        return self._path(rel)

    @contextlib.contextmanager
    def session(self, exclusive: bool = False) -> Iterator[None]:
        """Publishers share the store's lock (each layer goes in by a rename, so they
        cannot collide); gc takes it alone, so it never sees a layer published but not
        yet recorded."""
        if not os.path.isdir(self.root):
            if exclusive:  # gc: a mistyped store must not look like an empty one
                raise PublishError(f"the store {self.root} does not exist: fix the store's "
                                   "path")
            os.makedirs(self.root, mode=0o755, exist_ok=True)  # publishing creates it
        own = os.path.join(self.root, STORE_DIR)
        os.makedirs(own, mode=0o755, exist_ok=True)
        with open(os.path.join(own, LOCK_FILE), "a+") as lock:
            take_lock(lock, exclusive, self.wait, self.root)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def record_lock(self, record: str, image: str) -> Iterator[None]:
        # Publishers share the session: the image's own lock, beside its record.
        path = self._inside(record) + ".lock"
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(path, "a+") as lock:
            take_lock(lock, True, self.wait, f"{image} in {self.root}")
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _inside(self, rel: str) -> str:
        path = self._path(rel)
        parent = os.path.realpath(os.path.dirname(path))
        if os.path.commonpath([parent, os.path.realpath(self.root)]) != \
                os.path.realpath(self.root):
            raise PublishError(f"{rel} leads out of the store {self.root} (a symbolic link "
                               "in the store?): nothing was changed; fix the store by hand")
        return os.path.join(parent, os.path.basename(path))

    def commit(self, writes: Dict[str, bytes], deletes: List[str]) -> None:
        for rel in deletes:
            path = self._inside(rel)
            if os.path.isdir(path) and not os.path.islink(path):
                # Out of sight first (a hidden sibling, swept as debris if this dies), so
                # nobody reads a half-deleted layer.
                doomed = os.path.join(os.path.dirname(path),
                                      f".{os.path.basename(path)}.partial-{os.getpid()}")
                os.rename(path, doomed)
                fdtree.remove_tree(doomed)
            elif os.path.lexists(path):
                os.unlink(path)
        for rel, data in writes.items():
            path = self._inside(rel)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            tmp = os.path.join(os.path.dirname(path),
                               f".{os.path.basename(path)}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.rename(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def has(self, rel: str) -> bool:
        return os.path.isdir(self._path(rel))

    def _partial(self, final: str) -> str:
        parent, name = os.path.split(final)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        # Partial directories of runs that died are swept when the same layer comes again
        # (not those of a run still going on this machine).
        for old in os.listdir(parent):
            if old.startswith(f".{name}.partial-") and not _alive(old.rsplit("-", 1)[-1]):
                with contextlib.suppress(OSError):
                    fdtree.remove_tree(os.path.join(parent, old))
        tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
        os.mkdir(tmp, 0o755)
        return tmp

    def _commit(self, tmp: str, final: str) -> None:
        mounts.syncfs(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if os.path.isdir(final):  # published meanwhile by another run: same content
                with contextlib.suppress(OSError):
                    fdtree.remove_tree(tmp)
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
            with contextlib.suppress(OSError):
                fdtree.remove_tree(tmp)
            raise

    def scratch_tree(self, rel: str, workdir: Optional[str]) -> str:
        # In the store itself: the finished tree is renamed into place.
        return self._partial(self._path(rel))

    def publish_tree(self, rel: str, tree: str) -> None:
        final = self._path(rel)
        os.makedirs(os.path.dirname(final), mode=0o755, exist_ok=True)
        self._commit(tree, final)


class CvmfsStore(Store):
    """Publishes with `cvmfs_server ingest` on a CVMFS publisher (stratum 0) node.

    Each layer is two ingests (its `.metadata`, then its `layerfs`), each its own
    transaction that `cvmfs_server ingest` opens and publishes, as DUCC does; the files keep
    the image's owners (`--keep-ownership`). Around a run:
    - one cvmfs-thin at a time per repository (a lock in the repository's spool
      directory): a second one waits up to `wait` seconds, then is refused, naming the
      first;
    - every server step is bounded by `step_timeout` and says what it is waiting on;
    - a failed or interrupted step never leaves the repository in a transaction: a
      transaction this tool opened is aborted, then or by the next run (the spool
      directory records who opened it); one opened by anybody else is left alone and
      the run is refused with what to do.
    """

    def __init__(self, repo: str, cvmfs_root: str = "/cvmfs",
                 cvmfs_server: Optional[str] = None, wait: float = 0.0,
                 step_timeout: float = 3600.0, spool: str = CVMFS_SPOOL) -> None:
        super().__init__(repo)
        self.cvmfs_root = cvmfs_root
        self.cvmfs_server = cvmfs_server or os.environ.get("CVMFS_SERVER", "cvmfs_server")
        self.wait = wait
        self.step_timeout = step_timeout
        self.spool = os.path.join(spool, repo)
        self._locked = False

    def describe(self) -> str:
        return f"cvmfs:{self.repo}"

    def view(self, rel: str) -> str:
        return os.path.join(self.cvmfs_root, self.repo, rel)

    def has(self, rel: str) -> bool:
        return os.path.isdir(self.view(rel))

    # ------------------------------------------------------------ one publisher at a time

    def _in_transaction(self) -> bool:
        return os.path.exists(os.path.join(self.spool, "in_transaction.lock"))

    def _ours_file(self) -> str:
        return os.path.join(self.spool, TRANSACTION_OWNER)

    @contextlib.contextmanager
    def session(self, exclusive: bool = False) -> Iterator[None]:
        # One cvmfs-thin at a time per repository, whether it publishes or collects.
        if shutil.which(self.cvmfs_server) is None:
            raise PublishError(
                f"{self.cvmfs_server} not found: the cvmfs: store runs on a CVMFS publisher "
                "node (package cvmfs-server); elsewhere use --store dir:PATH")
        if not os.path.isdir(self.spool):
            raise PublishError(
                f"{self.repo} is not a repository of this publisher (no {self.spool}): "
                f"create it with `cvmfs_server mkfs {self.repo}`, or run cvmfs-thin on the "
                "repository's stratum 0")
        with open(os.path.join(self.spool, LOCK_FILE), "a+") as lock:
            take_lock(lock, True, self.wait, self.repo)
            try:
                self._recover()
                self._locked = True
                yield
            finally:
                self._locked = False
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _recover(self) -> None:
        """Under the lock: a transaction left open by a cvmfs-thin that died is aborted;
        anybody else's is refused."""
        ours = os.path.exists(self._ours_file())
        if self._in_transaction():
            if not ours:
                raise PublishError(
                    f"{self.repo} is in a transaction cvmfs-thin did not open (someone is "
                    f"publishing by hand, or another tool is): publish it (`cvmfs_server "
                    f"publish {self.repo}`) or abort it (`cvmfs_server abort {self.repo}`), "
                    "then retry")
            progress(f"{self.repo}: aborting the transaction an interrupted cvmfs-thin "
                      "left open")
            self._abort()
        elif ours:
            os.unlink(self._ours_file())

    def _abort(self) -> None:
        cmd = [self.cvmfs_server, "abort", "-f", self.repo]
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=ABORT_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise PublishError(
                f"`{' '.join(cmd)}` did not finish in {ABORT_TIMEOUT} s: {self.repo} may "
                f"still be in a transaction; check with `cvmfs_server list`") from None
        if r.returncode != 0 and self._in_transaction():
            raise PublishError(
                f"`{' '.join(cmd)}` failed ({r.returncode}): {self.repo} is still in a "
                f"transaction:\n{r.stdout.decode(errors='replace').strip()}")
        if os.path.exists(self._ours_file()):
            os.unlink(self._ours_file())

    # ------------------------------------------------------------ ingest

    def ingest_command(self, base_dir: str, catalog: bool) -> List[str]:
        cmd = [self.cvmfs_server, "ingest", "--keep-ownership", "--tar_file", "-",
               "--base_dir", base_dir]
        if catalog:
            cmd.append("--catalog")
        cmd.append(self.repo)
        return cmd

    def _ingest(self, base_dir: str, feed: Callable[[IO[bytes]], None], catalog: bool) -> None:
        self._run_ingest(self.ingest_command(base_dir, catalog), feed)

    def _run_ingest(self, cmd: List[str], feed: Optional[Callable[[IO[bytes]], None]]) -> None:
        """One `cvmfs_server ingest` (one transaction), bounded, never left open."""
        if not self._locked:
            raise RuntimeError("CvmfsStore: publish outside session()")
        shown = " ".join(cmd)
        # Whatever happens from here, a transaction left open is this run's to abort.
        with open(self._ours_file(), "w") as f:
            f.write(f"{os.getpid()}\n")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            os.unlink(self._ours_file())
            raise PublishError(
                f"{self.cvmfs_server} not found: the cvmfs: store runs on a CVMFS publisher "
                "node (package cvmfs-server); elsewhere use --store dir:PATH"
            ) from None
        assert proc.stdin is not None and proc.stdout is not None
        stdout = proc.stdout
        output: List[bytes] = []
        reader = threading.Thread(target=lambda: output.append(stdout.read()), daemon=True)
        reader.start()
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(self.step_timeout, expire)
        timer.start()
        try:
            try:
                if feed is not None:
                    feed(proc.stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            self._abort_if_open()
            raise
        finally:
            timer.cancel()
            reader.join(10)
        text = b"".join(output).decode(errors="replace").strip()
        if rc != 0 or self._in_transaction():
            self._abort_if_open()
            why = (f"did not finish in {self.step_timeout:.0f} s (--step-timeout) and was "
                   "stopped" if timed_out.is_set() else f"failed with exit code {rc}")
            raise PublishError(f"`{shown}` {why} (the transaction was not published; "
                               f"{self.repo} is not left in a transaction):\n{text}")
        os.unlink(self._ours_file())

    def _abort_if_open(self) -> None:
        if self._in_transaction():
            self._abort()
        elif os.path.exists(self._ours_file()):
            os.unlink(self._ours_file())

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

    def commit(self, writes: Dict[str, bytes], deletes: List[str]) -> None:
        """One ingest, so one transaction: `--delete` for each of `deletes`, and the files
        `writes` (all in one directory) from a tar."""
        cmd = [self.cvmfs_server, "ingest"]
        for rel in deletes:
            cmd += ["--delete", rel]
        feed: Optional[Callable[[IO[bytes]], None]] = None
        if writes:
            bases = {os.path.dirname(rel) for rel in writes}
            if len(bases) != 1:
                raise ValueError(f"commit: files in several directories: {sorted(bases)}")
            data = io.BytesIO()
            with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for rel, content in sorted(writes.items()):
                    ti = tarfile.TarInfo(os.path.basename(rel))
                    ti.size, ti.mode, ti.mtime = len(content), 0o644, int(time.time())
                    tf.addfile(ti, io.BytesIO(content))
            cmd += ["--tar_file", "-", "--base_dir", bases.pop()]
            feed = lambda out: _write_all(out, data.getvalue())  # noqa: E731
        if not deletes and not writes:
            return
        self._run_ingest([*cmd, self.repo], feed)

    def publish_tree(self, rel: str, tree: str) -> None:
        def feed(out: IO[bytes]) -> None:
            archive.write_layer_tar(out, tree)  # a plain tar: the tree has no whiteouts

        try:
            self._ingest(rel, feed, True)
        finally:
            with contextlib.suppress(OSError):
                fdtree.remove_tree(tree)


def take_lock(lock: IO[str], exclusive: bool, wait: float, what: str) -> None:
    """flock `lock` (exclusively or shared), waiting up to `wait` seconds for whoever
    holds it; refused then, naming the holder an exclusive taker wrote into it."""
    deadline = time.monotonic() + wait
    said = False
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    while True:
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            if time.monotonic() >= deadline:
                raise PublishError(
                    f"another cvmfs-thin ({holder}) is publishing into {what}: retry when "
                    "it is done, or pass --wait SECONDS to wait for it"
                ) from None
            if not said:
                progress(f"waiting up to {wait:.0f} s for another cvmfs-thin ({holder}) "
                         f"publishing into {what}")
                said = True
            time.sleep(0.5)
    if exclusive:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {os.uname().nodename} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server step and what it started (cvmfs_server runs swissknife, mounts)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def progress(message: str) -> None:
    """A line of what cvmfs-thin is doing, on stderr (stdout carries the results)."""
    _progress.clear_active()
    print(f"cvmfs-thin: {message}", file=sys.stderr, flush=True)


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


def parse_store(spec: str, repo: Optional[str], cvmfs_root: str, wait: float = 0.0,
                step_timeout: float = 3600.0) -> Store:
    kind, _, value = spec.partition(":")
    if kind == "dir" and value:
        if not repo:
            raise PublishError("--repo is required with a dir: store (the repository name "
                               "nodes will see the store under, e.g. unpacked.example.org)")
        return DirStore(value, repo, wait)
    if kind == "cvmfs" and value:
        if repo and repo != value:
            raise PublishError(f"--repo {repo} differs from the store's repository {value}")
        return CvmfsStore(value, cvmfs_root, wait=wait, step_timeout=step_timeout)
    raise PublishError(f"unknown store {spec!r}: use dir:PATH or cvmfs:REPOSITORY")


def check_repo_name(repo: str) -> str:
    try:
        return thin.check_repository_name(repo)
    except DriverError as e:
        raise PublishError(str(e)) from None
