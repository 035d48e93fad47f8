"""`cvmfs-graphdriver serve` as a process: its own socket, socket activation, sd_notify."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def call(path: str, method: str, body: dict) -> dict:
    conn = UnixHTTPConnection(path)
    conn.request("POST", f"/{method}", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return data


def wait_for(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    return out.decode(errors="replace")


def test_serve_binds_its_socket_0600_and_notifies_readiness(tmp_path):
    sock_path = str(tmp_path / "plugins" / "cvmfs.sock")
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(15)
    config = tmp_path / "config.ini"
    config.write_text(f"[driver]\nsocket = {sock_path}\nlog_level = debug\n")
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_graphdriver", "serve", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message.splitlines()
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        # volumes = true by default: the same socket is also a VolumeDriver
        assert call(sock_path, "Plugin.Activate", {}) == {
            "Implements": ["GraphDriver", "VolumeDriver"]}
        caps = call(sock_path, "GraphDriver.Capabilities", {})
        assert caps == {"Capabilities": {"ReproducesExactDiffs": False}}
        err = call(sock_path, "GraphDriver.Get", {"ID": "a" * 64})
        assert "Init" in err["Err"]  # says what is wrong: dockerd has not initialised it
    finally:
        log = stop(proc)
        notify.close()
    assert proc.returncode == 0, log
    assert not os.path.exists(sock_path), "the socket it bound is removed on exit"


def test_serve_refuses_a_socket_another_process_serves(tmp_path):
    sock_path = str(tmp_path / "busy.sock")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(sock_path)
    holder.listen(1)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cvmfs_graphdriver", "serve", "--socket", sock_path],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        holder.close()
    assert r.returncode == 2
    assert "already serves" in r.stderr


def test_serve_uses_a_socket_passed_by_systemd(tmp_path):
    """Socket activation: systemd hands over fd 3 with LISTEN_FDS=1 and LISTEN_PID."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    activated = str(tmp_path / "activated.sock")
    listener.bind(activated)
    listener.listen(8)
    unused = str(tmp_path / "configured.sock")  # what it would bind without systemd
    fd = listener.fileno()
    # What systemd does between fork and exec: the socket becomes fd 3, LISTEN_PID is the
    # process's own pid.
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'cvmfs_graphdriver', 'serve',"
        f" '--socket', {unused!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], pass_fds=[fd],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    listener.close()  # the daemon holds it now
    try:
        try:
            wait_for(lambda: _answers(activated))
        except AssertionError:
            raise AssertionError(f"no answer on the activated socket; log:\n{stop(proc)}") from None
        assert call(activated, "Plugin.Activate", {}) == {
            "Implements": ["GraphDriver", "VolumeDriver"]}
        assert not os.path.exists(unused)
    finally:
        log = stop(proc)
    assert proc.returncode == 0, log
    assert os.path.exists(activated), "an activated socket belongs to systemd: left in place"


def _answers(path: str) -> bool:
    try:
        call(path, "Plugin.Activate", {})
        return True
    except OSError:
        return False


@pytest.mark.parametrize("text, message", [
    ("[driver]\nbogus = 1\n", "unknown key 'bogus'"),
    ("[driver]\nrepositories = ../etc\n", "invalid repository name"),
    ("[driver]\ncvmfs_root = relative\n", "must be an absolute path"),
])
def test_serve_exits_2_naming_a_bad_configuration(tmp_path, text, message):
    config = tmp_path / "config.ini"
    config.write_text(text)
    r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver", "serve",
                        "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert message in r.stderr and str(config) in r.stderr


# Eight threads allocate at once, then the C library's malloc_info counts its arenas.
ARENAS = """
import ctypes, os, sys, threading
from cvmfs_graphdriver.memory import limit_malloc_arenas
print(limit_malloc_arenas())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p] * 2
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
start = threading.Barrier(8)
def allocate():
    start.wait()
    for p in [libc.malloc(4096) for _ in range(2000)]:
        libc.free(p)
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
fp = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
print(open(sys.argv[1]).read().count("<heap nr="))
"""


@pytest.mark.parametrize("operator", [None, "8"])
def test_the_daemons_keep_two_malloc_arenas_unless_the_operator_says(tmp_path, operator):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if operator:
        env["MALLOC_ARENA_MAX"] = operator
    out = subprocess.run([sys.executable, "-c", ARENAS, str(tmp_path / "malloc.xml")],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    if operator:
        assert out[0] == "False" and int(out[1]) > 2, out  # the operator's 8 stand
    else:
        assert out == ["True", "2"], out


# 600 blocks of 100 KiB (below glibc's mmap threshold: from the heap) are written, then
# freed but the last, which keeps the heap's top from shrinking by itself.
TRIM = """
import ctypes, sys
from cvmfs_graphdriver.memory import release_free_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024
blocks = [libc.malloc(100 << 10) for _ in range(600)]
for p in blocks:
    ctypes.memset(p, 1, 100 << 10)
for p in blocks[:-1]:
    libc.free(p)
freed = rss()
print(release_free_memory(), freed, rss())
"""


def test_release_free_memory_gives_freed_heap_pages_back():
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True", out
    freed, trimmed = int(out[1]), int(out[2])
    assert freed - trimmed > 40, f"RSS {freed} MB after free, {trimmed} MB after the trim"
