"""containerd's Snapshots gRPC service (`containerd.services.snapshots.v1.Snapshots`) over
an OverlaySnapshotter, and the daemon that serves it on a unix socket.

Errors map to gRPC codes as containerd's errdefs.ToGRPC maps them (NotFound,
AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable, Unimplemented,
ResourceExhausted for a full disk; anything else is Unknown), with containerd-style
messages. `List` streams in batches of 100, as containerd's own service does.

Serving: on the configured socket (mode 0600) bound by gRPC itself, or, under systemd
socket activation, on the socket systemd passes: gRPC cannot adopt a listening
descriptor, so connections accepted there are relayed byte for byte to gRPC listening
on a private socket in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterable, List, Optional, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..errors import DriverError
from ..sockets import activated_socket, sd_notify
from .api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .errdefs import SnapshotterError
from .metastore import Info
from .mountspec import Mount
from .overlay import OverlaySnapshotter, validate_labels

log = logging.getLogger("cvmfs_graphdriver.snapshotter")

SERVICE = "containerd.services.snapshots.v1.Snapshots"
LIST_BATCH = 100
STOP_GRACE_SECONDS = 10

_F = TypeVar("_F", bound=Callable[..., Any])


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_proto(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name, parent=info.parent, kind=snapshots_pb2.Kind.Name(info.kind),
        created_at=_timestamp(info.created_ns), updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels))


def mounts_to_proto(mounts: Iterable[Mount]) -> List[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _code(err: SnapshotterError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code_name, grpc.StatusCode.UNKNOWN)  # type: ignore[no-any-return]


def _rpc(method: _F) -> _F:
    """Turn snapshotter errors into gRPC statuses; log the unexpected ones."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        name = method.__name__
        try:
            result = method(self, request, context)
            if name == "List":  # a generator: errors surface while iterating
                result = list(result)
                return iter(result)
            return result
        except SnapshotterError as e:
            log.debug("%s: %s", name, e)
            context.abort(_code(e), str(e))
        except OSError as e:
            log.error("%s failed: %s", name, e, exc_info=True)
            context.abort(grpc.StatusCode.UNKNOWN, f"{name}: {e}")
        raise AssertionError("unreachable")  # context.abort raises

    return wrapper  # type: ignore[return-value]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """The servicer: one method per RPC, each a thin translation to OverlaySnapshotter."""

    def __init__(self, snapshotter: OverlaySnapshotter) -> None:
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        labels = dict(request.labels)
        validate_labels(labels)
        mounts = self.sn.prepare(request.key, request.parent, labels)
        log.debug("Prepare %r on %r: %s", request.key, request.parent, mounts)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    @_rpc
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        labels = dict(request.labels)
        validate_labels(labels)
        mounts = self.sn.view(request.key, request.parent, labels)
        log.debug("View %r on %r: %s", request.key, request.parent, mounts)
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    @_rpc
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return snapshots_pb2.MountsResponse(mounts=mounts_to_proto(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        labels = dict(request.labels)
        validate_labels(labels)
        self.sn.commit(request.name, request.key, labels)
        log.debug("Commit %r as %r", request.key, request.name)
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.sn.remove(request.key)
        log.debug("Remove %r", request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return snapshots_pb2.StatSnapshotResponse(info=info_to_proto(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        labels = dict(request.info.labels)
        validate_labels(labels)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(request.info.name, labels, paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_proto(info))

    @_rpc
    def List(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        infos = self.sn.walk(list(request.filters))
        for i in range(0, len(infos), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[info_to_proto(x) for x in infos[i:i + LIST_BATCH]])

    @_rpc
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        u = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=u.size, inodes=u.inodes)

    @_rpc
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.sn.cleanup()
        return empty_pb2.Empty()


def build_server(snapshotter: OverlaySnapshotter, max_workers: int = 16) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    return server


# ---------------------------------------------------------------------------- sockets


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def claim_socket_path(path: str) -> None:
    """Make `path` free for our socket: refuse a non-socket or a socket someone serves;
    remove a stale socket of a previous run (the checks of sockets.bind_socket)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DriverError(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise DriverError(f"another process already serves {path}; stop it first")
    os.unlink(path)


def _bind_grpc(server: grpc.Server, path: str) -> None:
    """Listen on unix socket `path`, mode 0600 (only root may talk to a root daemon)."""
    old = os.umask(0o177)
    try:
        try:
            port = server.add_insecure_port(f"unix:{path}")
        except RuntimeError as e:
            raise DriverError(f"cannot listen on {path}: {e}") from None
        if port == 0:
            raise DriverError(f"cannot listen on {path}")
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


class Relay:
    """Accept on `listener` and pipe each connection to the unix socket `target`."""

    def __init__(self, listener: socket.socket, target: str) -> None:
        self.listener = listener
        self.target = target
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # Never shutdown() the listener: systemd shares it (the same open socket), and a
        # shut-down socket refuses every connection until the socket unit restarts -
        # containerd could not reach the next run of the service.
        self._stopped.set()
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            # Wait with select rather than a socket timeout: that would set O_NONBLOCK on
            # the socket systemd shares, for systemd and the next run too.
            ready, _, _ = select.select([self.listener], [], [], 0.5)
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another accept (a previous run still exiting) took it
            except OSError as e:
                log.error("relay: accept failed: %s", e)
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.target)
        except OSError as e:
            log.error("relay: cannot reach %s: %s", self.target, e)
            conn.close()
            upstream.close()
            return
        back = threading.Thread(target=self._pump, args=(upstream, conn), daemon=True)
        back.start()
        self._pump(conn, upstream)
        back.join()
        conn.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------- daemon


def run(home: str, socket_path: str, sync_commits: bool = True,
        setup: Optional[Callable[[OverlaySnapshotter], object]] = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status. Mounts are never touched."""
    snapshotter = OverlaySnapshotter(home, sync_commits=sync_commits)
    if setup is not None:
        setup(snapshotter)
    server = build_server(snapshotter)
    activated = activated_socket()
    relay: Optional[Relay] = None
    private_dir: Optional[str] = None
    bound: Optional[str] = None
    if activated is not None:
        private_dir = tempfile.mkdtemp(prefix="cvmfs-snapshotter-grpc-")  # mode 0700
        private = os.path.join(private_dir, "grpc.sock")
        _bind_grpc(server, private)
        relay = Relay(activated, private)
        where = f"socket from systemd (fd {activated.fileno()})"
    else:
        claim_socket_path(socket_path)
        _bind_grpc(server, socket_path)
        bound = socket_path
        where = socket_path

    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (mounts stay: running containers keep their snapshots)",
                 signum)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    if relay is not None:
        relay.start()
    log.info("snapshotter serving %s on %s (home %s, mount options: index=off %s, "
             "userxattr %s)", SERVICE, where, snapshotter.layout.home,
             snapshotter.options.index_off, snapshotter.options.userxattr)
    sd_notify(f"READY=1\nSTATUS=snapshotter listening on {where}")
    try:
        # A short wait: SIGTERM may be delivered to one of gRPC's threads, and Python runs
        # the handler only when the main thread next executes code.
        while not stopping.wait(0.5):
            pass
        sd_notify("STOPPING=1")
    finally:
        if relay is not None:
            relay.stop()
        server.stop(STOP_GRACE_SECONDS).wait()
        snapshotter.close()
        if bound is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound)
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
    return 0

