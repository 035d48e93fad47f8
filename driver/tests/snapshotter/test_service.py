"""`cvmfs-graphdriver snapshotter` as a process, over gRPC: socket, readiness, socket
activation, error codes, SIGTERM and kill -9."""

from __future__ import annotations

import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from sntools import Client, Daemon, answers, mounted, need, need_grpc, wait_for


@pytest.fixture
def root():
    need(os.geteuid() == 0, "needs root (the snapshotter chowns; tests mount snapshots)")
    need_grpc()


@pytest.fixture
def daemon(root, new_daemon):
    d = new_daemon().start()
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    c = Client(daemon.socket)
    yield c
    c.close()


def _state(client: Client, daemon: Daemon):
    infos = sorted((i.name, i.kind, i.parent, tuple(sorted(i.labels.items())),
                    i.created_at.ToNanoseconds(), i.updated_at.ToNanoseconds())
                   for i in client.list())
    dirs = sorted(os.listdir(os.path.join(daemon.home, "snapshots")))
    return infos, dirs, os.listdir(os.path.join(daemon.home, "staging"))


def test_socket_0600_readiness_and_clean_sigterm(root, tmp_path, new_daemon):
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)
    d = new_daemon(env=dict(os.environ, NOTIFY_SOCKET=notify_path))
    d.start()
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message.splitlines()
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d.home).st_mode) == 0o700
        c = Client(d.socket)
        c.prepare("a")
        c.close()
    finally:
        status = d.stop()
        notify.close()
    assert status == 0, d.log()
    assert not os.path.exists(d.socket), "the socket it bound is removed on exit"
    assert "Traceback" not in d.log()


def test_sigterm_that_lands_on_another_thread_stops_it_promptly(root, new_daemon):
    """A process-directed SIGTERM may be delivered to any thread (gRPC runs many): send it
    to one that is not the main thread, as the kernel may, and the daemon still stops."""
    import ctypes

    need(platform.machine() == "x86_64", "the tgkill syscall number below is x86_64's")
    d = new_daemon().start()
    c = Client(d.socket)
    c.prepare("a")  # gRPC's threads are up
    c.close()
    assert d.proc is not None
    pid = d.proc.pid
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the daemon runs threads besides the main one"
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234  # x86_64
    assert libc.syscall(sys_tgkill, pid, others[-1], signal.SIGTERM) == 0
    started = time.monotonic()
    try:
        d.proc.wait(15)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        raise AssertionError("SIGTERM on a non-main thread did not stop the daemon") from None
    assert d.proc.returncode == 0, d.log()
    assert time.monotonic() - started < 15


def test_socket_passed_by_systemd(root, tmp_path, new_daemon):
    """Socket activation: systemd hands over fd 3 (LISTEN_FDS=1, LISTEN_PID); gRPC is
    reached through it, List streams included. systemd keeps the socket open across
    restarts of the service: after one run stops, the next run (the same socket) must be
    reachable again - stopping must not shut the shared socket down."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    activated = str(tmp_path / "activated.sock")
    listener.bind(activated)
    listener.listen(16)
    d = new_daemon()
    fd = listener.fileno()
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        f"os.execv(sys.executable, {d.command()!r})\n"
    )
    os.makedirs(d.workdir, exist_ok=True)

    def start() -> subprocess.Popen:
        with open(d.log_path, "ab") as logf:
            return subprocess.Popen([sys.executable, "-c", launcher], pass_fds=[fd],
                                    stdout=logf, stderr=subprocess.STDOUT)

    try:
        proc = start()
        try:
            c = Client(activated)  # connections queue in the backlog until it serves
            for i in range(130):
                c.prepare(f"k{i:03}", labels={"n": str(i)})
            assert len(c.list()) == 130
            assert c.names("labels.n==129") == ["k129"]
            assert c.code(c.stat, "nope")[0] == "NOT_FOUND"
            c.close()
            assert not os.path.exists(d.socket), "with a socket from systemd it binds none"
        finally:
            proc.terminate()
            proc.wait(30)
        assert proc.returncode == 0, d.log()
        proc = start()  # `systemctl restart` of the service: the same socket again
        try:
            c = Client(activated)
            assert c.names("labels.n==7") == ["k007"]
            c.close()
        finally:
            proc.terminate()
            proc.wait(30)
        assert proc.returncode == 0, d.log()
    finally:
        listener.close()


def test_refuses_a_socket_path_in_use_or_not_a_socket(root, tmp_path):
    busy = str(tmp_path / "busy.sock")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(busy)
    holder.listen(1)
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    try:
        for path, message in ((busy, "already serves"), (str(plain), "not a socket")):
            r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver", "snapshotter",
                                "--config", "/dev/null", "--home", str(tmp_path / "h"),
                                "--socket", path], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2 and message in r.stderr, r.stderr
    finally:
        holder.close()
    assert plain.read_text() == "not a socket"


def test_one_daemon_per_home(root, tmp_path, new_daemon):
    first = new_daemon("first").start()
    try:
        r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver", "snapshotter",
                            "--config", first.config, "--home", first.home,
                            "--socket", str(tmp_path / "second.sock")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert f"another snapshotter is using {first.home}" in r.stderr
        assert answers(first.socket)
    finally:
        assert first.stop() == 0
    again = new_daemon("first").start()  # released on exit
    assert again.stop() == 0


def test_stale_socket_of_a_killed_daemon_is_replaced(root, new_daemon):
    d = new_daemon().start()
    d.kill9()
    assert os.path.exists(d.socket) and not answers(d.socket)
    d.start()
    assert d.stop() == 0


def test_bad_input_gets_a_clear_error_and_changes_nothing(client, daemon):
    c = client
    c.prepare("active")
    c.prepare("tmp")
    c.commit("committed", "tmp", {"keep": "me"})
    c.prepare("child", "committed")
    c.view("view", "committed")
    before = _state(c, daemon)
    expect = [
        ((c.stat, "nope"), "NOT_FOUND", "nope"),
        ((c.mounts, "nope"), "NOT_FOUND", "nope"),
        ((c.usage, "nope"), "NOT_FOUND", "nope"),
        ((c.remove, "nope"), "NOT_FOUND", "nope"),
        ((c.commit, "x", "nope"), "NOT_FOUND", "nope"),
        ((c.update, "nope", {"a": "b"}), "NOT_FOUND", ""),
        ((c.prepare, "new", "active"), "INVALID_ARGUMENT", "not committed"),
        ((c.view, "new", "missing"), "NOT_FOUND", "missing"),
        ((c.prepare, "active"), "ALREADY_EXISTS", "active"),
        ((c.prepare, "committed"), "ALREADY_EXISTS", "committed"),
        ((c.prepare, ""), "INVALID_ARGUMENT", "empty"),
        ((c.commit, "", "active"), "INVALID_ARGUMENT", "empty"),
        ((c.commit, "committed", "active"), "ALREADY_EXISTS", "committed"),
        ((c.commit, "x", "view"), "FAILED_PRECONDITION", "not active"),
        ((c.commit, "x", "committed"), "FAILED_PRECONDITION", "not active"),
        ((c.remove, "committed"), "FAILED_PRECONDITION", "child"),
        ((c.mounts, "committed"), "FAILED_PRECONDITION", "not active or view"),
        ((c.update, "committed", {"a": "b"}, ["parent"]), "INVALID_ARGUMENT", "parent"),
        ((c.update, "committed", {"a": "b"}, ["name"]), "INVALID_ARGUMENT", "name"),
        ((c.list, "kind=="), "INVALID_ARGUMENT", "parse error"),
        ((c.list, 'labels."unterminated==x'), "INVALID_ARGUMENT", "not terminated"),
        ((c.prepare, "big", "", {"k": "v" * 4096}), "INVALID_ARGUMENT", "maximum size"),
        ((c.update, "committed", {"k": "v" * 4096}), "INVALID_ARGUMENT", "maximum size"),
    ]
    for (call, *args), code, words in expect:
        got, details = c.code(call, *args)
        assert got == code, (call.__name__, args, got, details)
        assert words in details, (call.__name__, args, details)
    assert _state(c, daemon) == before
    assert "Traceback" not in daemon.log()


def test_list_streams_in_batches_of_100(client):
    for i in range(250):
        client.prepare(f"s{i:03}")
    responses = list(client.stub.List(client.pb.ListSnapshotsRequest(), timeout=60))
    assert [len(r.info) for r in responses] == [100, 100, 50]
    assert [i.name for r in responses for i in r.info] == [f"s{i:03}" for i in range(250)]


def test_stat_update_usage_timestamps(client):
    t0 = time.time_ns()
    client.prepare("a", labels={"l1": "v1", "l2": "v2"})
    info = client.stat("a")
    assert info.kind == client.pb.ACTIVE and info.parent == ""
    assert t0 <= info.created_at.ToNanoseconds() == info.updated_at.ToNanoseconds()
    updated = client.update("a", {"l1": "x", "l3": "y"}, ["labels.l1", "labels.l2"])
    assert dict(updated.labels) == {"l1": "x"}
    assert updated.created_at == info.created_at
    assert updated.updated_at.ToNanoseconds() > info.updated_at.ToNanoseconds()
    assert dict(client.update("a", {"z": "1"}).labels) == {"z": "1"}  # no mask: all labels
    assert client.usage("a").inodes == 1


def test_sigterm_keeps_mounts_and_a_restart_finds_everything(root, tmp_path, new_daemon):
    d = new_daemon().start()
    c = Client(d.socket)
    with mounted(c.prepare("base"), str(tmp_path / "b")) as m, open(f"{m}/file", "w") as f:
        f.write("base")
    c.commit("BASE", "base")
    rootfs = str(tmp_path / "rootfs")
    os.makedirs(rootfs)
    mounts = c.prepare("container", "BASE")
    with mounted(mounts, rootfs):
        c.close()
        assert d.stop() == 0
        # the daemon is gone; the container's mount is not
        with open(f"{rootfs}/file") as f:
            assert f.read() == "base"
        with open(f"{rootfs}/new", "w") as f:
            f.write("written while the snapshotter was down")
        d.start()
        c = Client(d.socket)
        assert c.mounts("container") == mounts
        assert {i.name for i in c.list()} == {"BASE", "container"}
    c.commit("C", "container")
    with mounted(c.view("v", "C"), str(tmp_path / "v")) as m:
        assert sorted(os.listdir(m)) == ["file", "new"]
    c.close()
    assert d.stop() == 0


def test_kill_9_mid_use_loses_no_acknowledged_snapshot(root, new_daemon):
    """Clients prepare and commit as fast as they can; the daemon is killed with SIGKILL
    while they do; restarted, it has every snapshot it acknowledged, nothing half-made,
    and a Cleanup leaves exactly one directory per snapshot."""
    d = new_daemon().start()
    acked_active, acked_committed = {}, set()
    lock = threading.Lock()
    stop = threading.Event()
    errors = []

    def worker(n: int) -> None:
        c = Client(d.socket)
        parent = ""
        i = 0
        while not stop.is_set():
            key, name = f"w{n}-a{i}", f"w{n}-c{i}"
            try:
                c.prepare(key, parent, {"containerd.io/snapshot.ref": name})
                with lock:
                    acked_active[key] = name
                c.commit(name, key, {"containerd.io/snapshot.ref": name})
                with lock:
                    del acked_active[key]
                    acked_committed.add((name, parent))
            except c.grpc.RpcError as e:
                if e.code() != c.grpc.StatusCode.UNAVAILABLE:
                    errors.append(e)
                break
            parent = name if i % 3 else ""
            i += 1
        c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked_committed) >= 40, 120, "40 committed snapshots")
    d.kill9()
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    d.start()
    c = Client(d.socket)
    infos = {i.name: i for i in c.list()}
    for name, parent in acked_committed:
        assert name in infos, f"{name} was committed before the kill and is gone"
        assert infos[name].kind == c.pb.COMMITTED and infos[name].parent == parent
        assert dict(infos[name].labels) == {"containerd.io/snapshot.ref": name}
    for key, name in acked_active.items():  # prepared; its commit was in flight or not sent
        if key in infos:
            assert infos[key].kind == c.pb.ACTIVE
        else:  # the commit went through before the kill, its answer did not
            assert name in infos, f"{key} was prepared before the kill and is gone"
            assert infos[name].kind == c.pb.COMMITTED
    for name, info in infos.items():  # every snapshot it knows is whole
        if info.kind == c.pb.ACTIVE:
            (m,) = c.mounts(name)
            paths = [m.source] if m.type == "bind" else [
                o.split("=", 1)[1] for o in m.options if o.startswith(("upperdir", "workdir"))]
            assert all(os.path.isdir(p) for p in paths), (name, m)
    c.cleanup()
    snapshot_dirs = os.listdir(os.path.join(d.home, "snapshots"))
    assert len(snapshot_dirs) == len(infos)
    assert os.listdir(os.path.join(d.home, "staging")) == []
    c.prepare("after-restart", sorted(n for n, _ in acked_committed)[0])
    c.close()
    assert d.stop() == 0
