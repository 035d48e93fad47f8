"""Helpers for the snapshotter tests: the daemon as a process, a gRPC client, requirements."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from harness import need, socket_answers, wait_until


def need_grpc() -> None:
    try:
        import grpc  # noqa: F401

        from cvmfs_graphdriver.snapshotter import service  # noqa: F401
    except ImportError as e:
        need(False, f"grpcio/protobuf not importable ({e}): pip install -e 'driver[test]'")


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    wait_until(cond, timeout, what)


answers = socket_answers


@dataclass
class Daemon:
    """`cvmfs-graphdriver snapshotter` as a process, with its own home, socket and config."""

    workdir: str
    extra: List[str] = field(default_factory=list)
    env: Optional[Dict[str, str]] = None
    proc: Optional[subprocess.Popen] = None

    @property
    def home(self) -> str:
        return os.path.join(self.workdir, "home")

    @property
    def socket(self) -> str:
        return os.path.join(self.workdir, "snapshotter.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "snapshotter.log")

    @property
    def config(self) -> str:
        path = os.path.join(self.workdir, "config.ini")
        os.makedirs(self.workdir, exist_ok=True)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("[driver]\nlog_level = debug\n")
        return path

    def command(self) -> List[str]:
        return [sys.executable, "-m", "cvmfs_graphdriver", "snapshotter", "--config",
                self.config, "--home", self.home, "--socket", self.socket, *self.extra]

    def start(self) -> Daemon:
        os.makedirs(self.workdir, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        logf.close()
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or answers(self.socket), 60,
                 f"snapshotter socket {self.socket}")
        if proc.poll() is not None:
            raise RuntimeError(f"snapshotter exited with {proc.returncode}:\n{self.log()}")
        return self

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class Client:
    """A gRPC client of the Snapshots service (what containerd's proxy client sends)."""

    def __init__(self, socket_path: str) -> None:
        import grpc

        from cvmfs_graphdriver.snapshotter.api import snapshots_pb2, snapshots_pb2_grpc

        self.grpc = grpc
        self.pb = snapshots_pb2
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def prepare(self, key: str, parent: str = "", labels: Optional[Dict[str, str]] = None):
        return list(self.stub.Prepare(self.pb.PrepareSnapshotRequest(
            snapshotter="cvmfs", key=key, parent=parent, labels=labels or {}), timeout=60).mounts)

    def view(self, key: str, parent: str = "", labels: Optional[Dict[str, str]] = None):
        return list(self.stub.View(self.pb.ViewSnapshotRequest(
            snapshotter="cvmfs", key=key, parent=parent, labels=labels or {}), timeout=60).mounts)

    def mounts(self, key: str):
        return list(self.stub.Mounts(self.pb.MountsRequest(snapshotter="cvmfs", key=key),
                                     timeout=60).mounts)

    def commit(self, name: str, key: str, labels: Optional[Dict[str, str]] = None) -> None:
        self.stub.Commit(self.pb.CommitSnapshotRequest(
            snapshotter="cvmfs", name=name, key=key, labels=labels or {}), timeout=60)

    def remove(self, key: str) -> None:
        self.stub.Remove(self.pb.RemoveSnapshotRequest(snapshotter="cvmfs", key=key), timeout=60)

    def stat(self, key: str):
        return self.stub.Stat(self.pb.StatSnapshotRequest(snapshotter="cvmfs", key=key),
                              timeout=60).info

    def update(self, name: str, labels: Dict[str, str], paths: Optional[List[str]] = None):
        from google.protobuf import field_mask_pb2

        req = self.pb.UpdateSnapshotRequest(snapshotter="cvmfs",
                                            info=self.pb.Info(name=name, labels=labels))
        if paths is not None:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
        return self.stub.Update(req, timeout=60).info

    def usage(self, key: str):
        return self.stub.Usage(self.pb.UsageRequest(snapshotter="cvmfs", key=key), timeout=60)

    def list(self, *filters: str):
        out = []
        for resp in self.stub.List(self.pb.ListSnapshotsRequest(snapshotter="cvmfs",
                                                                 filters=list(filters)),
                                   timeout=60):
            out.extend(resp.info)
        return out

    def names(self, *filters: str) -> List[str]:
        return sorted(i.name for i in self.list(*filters))

    def cleanup(self) -> None:
        self.stub.Cleanup(self.pb.CleanupRequest(snapshotter="cvmfs"), timeout=120)

    def code(self, call, *args, **kw):
        """The gRPC status code name and details of a call that must fail."""
        try:
            call(*args, **kw)
        except self.grpc.RpcError as e:
            return e.code().name, e.details()
        raise AssertionError(f"{call.__name__}{args} succeeded; an error was expected")


def mount_all(mounts, target: str) -> None:
    """Mount what the snapshotter returned, as containerd's mount.All does (one mount)."""
    assert len(mounts) == 1, mounts
    m = mounts[0]
    opts = list(m.options)
    if m.type == "bind":
        ro = "ro" in opts
        subprocess.run(["mount", "--rbind" if "rbind" in opts else "--bind", m.source, target],
                       check=True)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro,bind", target], check=True)
    else:
        cwd = None
        if m.type == "overlay" and len(",".join(opts)) >= PAGE_SIZE - 512:
            cwd, opts = compact_lowerdir(opts)
        subprocess.run(["mount", "-t", m.type, "-o", ",".join(opts), m.source, target],
                       check=True, cwd=cwd)


PAGE_SIZE = 4096


def compact_lowerdir(opts: List[str]):
    """containerd's compactLowerdirOption (mount/mount_linux.go): lowerdirs relative to
    their common directory, which the mount is made from; (None, opts) when there is
    none but /."""
    idx = next((i for i, o in enumerate(opts) if o.startswith("lowerdir=")), -1)
    if idx == -1:
        return None, opts
    dirs = opts[idx][len("lowerdir="):].split(":")
    if len(dirs) == 1:
        return None, opts
    lo, hi = min(dirs), max(dirs)
    n = 0
    while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
        n += 1
    common = lo[:n]
    if not common:
        return None, opts
    # Go's path.Dir: "/a/b/" -> "/a/b", "/a/b/c" -> "/a/b"
    common = common.rstrip("/") if common.endswith("/") else os.path.dirname(common)
    if common in ("/", ""):
        return None, opts
    common += "/"
    return common, opts[:idx] + opts[idx + 1:] + [
        "lowerdir=" + ":".join(d[len(common):] for d in dirs)]


def unmount(target: str) -> None:
    subprocess.run(["umount", "-l", target], check=False)


@contextlib.contextmanager
def mounted(mounts, target: str) -> Iterator[str]:
    os.makedirs(target, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)
