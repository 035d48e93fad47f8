"""Clients going away mid-stream (issue 11, faults c), through the real plugin server:
an ApplyDiff body cut mid-entry or mid-chunk, a Diff whose reader takes a few KB and
closes. Each time: no layer left, committed layers intact, no mount left, the server
serves on, and the handler's thread and descriptors are gone (counted in-process:
threading.enumerate(), /proc/self/fd). test_driver_server.py has the cases the client
half-closes and reads the answer; here it closes outright."""

from __future__ import annotations

import os
import socket
import time

import pytest
from faultkit import bytes_lost, contents, fds, settle, threads
from harness import staging_left
from layer_tools import PluginClient, TarBuilder, mounts_below, new_id, read_tar

pytestmark = pytest.mark.root


def files_tar() -> bytes:
    b = TarBuilder().dir("data")
    for i in range(8):
        b.file(f"data/f{i}", os.urandom(512 * 1024))
    return b.bytes()


def head(method: str, framing: str) -> bytes:
    return (f"POST /{method} HTTP/1.1\r\nHost: plugin\r\n{framing}\r\n\r\n").encode()


def baseline(c: PluginClient):
    """Threads and descriptors with the server idle (its keep-alive connection open)."""
    c.call("GraphDriver.Status")
    time.sleep(0.1)
    return threads(), fds()


def check_after(c: PluginClient, tmp_path, before, layer: str, kept, diffs, tally) -> None:
    """The server serves on; nothing of `layer` left; committed `kept` intact; the
    threads and descriptors of `before` back."""
    fresh = PluginClient(c.path)
    try:
        if layer:
            assert fresh.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
            assert fresh.call("GraphDriver.Remove", {"ID": layer}) == {}  # as dockerd does
        assert fresh.call("GraphDriver.Status")["Status"]
    finally:
        fresh.close()
    lost = sum(bytes_lost(k, d) for k, d in zip(kept, diffs))
    threads_before, fds_before = before
    leaked_threads = len(settle(threads, threads_before)) - len(threads_before)
    leaked_fds = len(settle(fds, fds_before)) - len(fds_before)
    leaked_mounts = len(mounts_below(str(tmp_path)))
    staging = staging_left(str(tmp_path / "home"))
    leaks = max(0, leaked_threads) + max(0, leaked_fds) + leaked_mounts + len(staging)
    tally.lost(lost)
    tally.leaks(leaks)
    tally.fault(survived=lost == 0 and leaks == 0)
    assert (lost, leaked_threads, leaked_fds, leaked_mounts, staging) == (0, 0, 0, 0, [])


def committed(c: PluginClient, tmp_path, parent: str = ""):
    layer = new_id()
    c.call("GraphDriver.Create", {"ID": layer, "Parent": parent})
    c.apply_diff(layer, parent, files_tar())
    diff = str(tmp_path / "home" / layer / "diff")
    return layer, contents(diff), diff


@pytest.mark.parametrize("cut", ["length-mid-entry", "chunked-mid-chunk",
                                 "chunked-mid-size-line", "chunked-between-chunks"])
def test_apply_diff_client_gone_mid_body(inited, tmp_path, cut, tally):
    base, kept, diff = committed(inited, tmp_path)
    before = baseline(inited)
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer, "Parent": base})
    data = files_tar()
    method = f"GraphDriver.ApplyDiff?id={layer}&parent={base}"
    mid_entry = len(data) // 2 + 100  # inside data/f3's content
    if cut == "length-mid-entry":
        wire = head(method, f"Content-Length: {len(data)}") + data[:mid_entry]
    else:
        chunks = b"".join(b"%x\r\n" % len(data[i:i + 65536]) + data[i:i + 65536] + b"\r\n"
                          for i in range(0, len(data), 65536))
        at = {"chunked-mid-chunk": mid_entry,
              "chunked-mid-size-line": chunks.index(b"\r\n", mid_entry) + 3,
              "chunked-between-chunks": chunks.index(b"\r\n1", mid_entry) + 2}[cut]
        wire = head(method, "Transfer-Encoding: chunked") + chunks[:at]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(inited.path)
        s.sendall(wire)
    # (closed outright: dockerd killed) the server notices, fails the call and ends its
    # handler: its Remove, below, waits for that (the layer's lock)
    check_after(inited, tmp_path, before, layer, [kept], [diff], tally)


@pytest.mark.parametrize("how", ["native", "naive"])
def test_diff_reader_gone_after_a_few_kb(inited, tmp_path, how, tally):
    """`docker save`/`docker push` cancelled: the reader of a streamed Diff takes a
    few KB and closes. The naive Diff (against another parent) mounts both layers: they
    must be released."""
    base, kept_base, base_diff = committed(inited, tmp_path)
    layer, kept, diff = committed(inited, tmp_path, base)
    before = baseline(inited)
    parent = base if how == "native" else ""
    body = (f'{{"ID": "{layer}", "Parent": "{parent}"}}\n').encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(inited.path)
        s.sendall(head("GraphDriver.Diff", f"Content-Length: {len(body)}") + body)
        got = b""
        while len(got) < 8192:
            more = s.recv(4096)
            assert more, got
            got += more
        assert b" 200 " in got.split(b"\r\n", 1)[0]
    # the server's next writes fail (EPIPE); its handler must end and release the views
    fresh = PluginClient(inited.path)
    try:
        whole, _ = fresh.diff(layer, base)  # and the layer is still whole
        assert sorted(read_tar(whole)) == ["data"] + [f"data/f{i}" for i in range(8)]
    finally:
        fresh.close()
    check_after(inited, tmp_path, before, "", [kept_base, kept], [base_diff, diff], tally)
