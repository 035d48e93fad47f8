"""The plugin protocol through the real HTTP server on a unix socket, spoken as dockerd
speaks it: JSON calls on a keep-alive connection, ApplyDiff with a chunked body, Diff
answered with a chunked tar, concurrent pulls."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
from typing import Dict, Tuple

import pytest
from layer_tools import (
    PluginClient,
    PluginError,
    TarBuilder,
    mounts_below,
    new_id,
    read_tar,
)

from cvmfs_graphdriver import server, sockets
from cvmfs_graphdriver.config import Config
from cvmfs_graphdriver.driver import Driver

pytestmark = pytest.mark.root


@pytest.fixture
def inited(plugin, tmp_path) -> PluginClient:
    assert plugin.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    assert plugin.call("GraphDriver.Init", {"Home": str(tmp_path / "home"), "Opts": None,
                                            "UIDMaps": None, "GIDMaps": None}) == {}
    return plugin


def test_dockerd_sequence_pull_run_diff_commit(inited, tmp_path):
    c = inited
    caps = c.call("GraphDriver.Capabilities")
    assert caps == {"Capabilities": {"ReproducesExactDiffs": False}}

    base = new_id()
    assert c.call("GraphDriver.Create", {"ID": base, "Parent": "", "MountLabel": "",
                                         "StorageOpt": {}}) == {}
    base_tar = (TarBuilder().dir("bin").file("bin/sh", b"#!shell", mode=0o755)
                .dir("etc").file("etc/hostname", b"base").file("etc/gone", b"x").bytes())
    size = c.apply_diff(base, "", base_tar, chunk=100)
    assert size == {"Size": len(b"#!shell") + 4 + 1}
    assert c.call("GraphDriver.Exists", {"ID": base}) == {"Exists": True}
    assert c.call("GraphDriver.Exists", {"ID": new_id()}) == {"Exists": False}

    init, cid = f"{new_id()}-init", new_id()
    c.call("GraphDriver.CreateReadWrite", {"ID": init, "Parent": base, "MountLabel": "",
                                           "StorageOpt": {}})
    d = c.call("GraphDriver.Get", {"ID": init, "MountLabel": ""})["Dir"]
    assert os.path.isabs(d) and sorted(os.listdir(d)) == ["bin", "etc"]
    with open(os.path.join(d, "etc", "hostname"), "w") as f:
        f.write("init")
    c.call("GraphDriver.Put", {"ID": init})
    assert mounts_below(str(tmp_path)) == []

    c.call("GraphDriver.CreateReadWrite", {"ID": cid, "Parent": init})
    root = c.call("GraphDriver.Get", {"ID": cid})["Dir"]
    assert mounts_below(str(tmp_path)) == [root]
    with open(os.path.join(root, "hello"), "w") as f:  # docker run sh -c "echo hello > /hello"
        f.write("hello\n")
    os.unlink(os.path.join(root, "etc", "gone"))
    with open(os.path.join(root, "etc", "hostname"), "rb") as f:
        assert f.read() == b"init"

    changes = c.call("GraphDriver.Changes", {"ID": cid, "Parent": init})["Changes"]
    assert sorted(changes, key=lambda x: x["Path"]) == [
        {"Path": "/etc", "Kind": 0}, {"Path": "/etc/gone", "Kind": 2},
        {"Path": "/hello", "Kind": 1}]
    assert c.call("GraphDriver.DiffSize", {"ID": cid, "Parent": init}) == {"Size": 6}

    tar, resp = c.diff(cid, init)
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    entries = read_tar(tar)
    assert set(entries) == {"etc", "etc/.wh.gone", "hello"}
    assert entries["hello"][1] == b"hello\n"

    # docker diff / ps -s / commit must not unmount the running container's root
    assert mounts_below(str(tmp_path)) == [root]
    with open(os.path.join(root, "hello"), "rb") as f:
        assert f.read() == b"hello\n"

    meta = c.call("GraphDriver.GetMetadata", {"ID": cid})["Metadata"]
    assert meta["MergedDir"] == root
    assert meta["LowerDir"].split(":") == [os.path.join(str(tmp_path / "home"), x, "diff")
                                           for x in (init, base)]
    status = dict(map(tuple, c.call("GraphDriver.Status")["Status"]))
    assert status["Mounted Layers"] == "1"

    # docker commit: the diff becomes a new image layer on the image
    committed = new_id()
    c.call("GraphDriver.Create", {"ID": committed, "Parent": base})
    assert c.apply_diff(committed, base, tar) == {"Size": 6}
    view = c.call("GraphDriver.Get", {"ID": committed})["Dir"]
    assert sorted(os.listdir(view)) == ["bin", "etc", "hello"]
    assert os.listdir(os.path.join(view, "etc")) == ["hostname"]
    c.call("GraphDriver.Put", {"ID": committed})

    # docker rm, then dockerd shuts down
    c.call("GraphDriver.Put", {"ID": cid})
    for layer in (cid, init):
        assert c.call("GraphDriver.Remove", {"ID": layer}) == {}
        assert c.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
    assert c.call("GraphDriver.Cleanup") == {}
    assert mounts_below(str(tmp_path)) == []


def test_errors_are_err_strings_that_name_the_layer(inited):
    c = inited
    missing = new_id()
    with pytest.raises(PluginError) as e:
        c.call("GraphDriver.Get", {"ID": missing})
    assert e.value.status == 200 and missing in e.value.message
    with pytest.raises(PluginError) as e:
        c.call("GraphDriver.Create", {"ID": new_id(), "Parent": missing})
    assert missing in e.value.message
    # every id is checked where it enters, for every call that takes one
    for call, body in (("Create", {"ID": "../../etc"}), ("Get", {"ID": "../../etc"}),
                       ("Remove", {"ID": "l"}), ("Put", {"ID": "/etc"}),
                       ("Create", {"ID": new_id(), "Parent": "../x"}),
                       ("Changes", {"ID": new_id(), "Parent": ".."})):
        with pytest.raises(PluginError) as e:
            c.call(f"GraphDriver.{call}", body)
        assert "invalid layer id" in e.value.message or "invalid parent id" in e.value.message
    assert c.call("GraphDriver.Exists", {"ID": "../../etc"}) == {"Exists": False}
    with pytest.raises(PluginError) as e:
        c.call("GraphDriver.Create", {"ID": 42})
    assert "ID" in e.value.message
    with pytest.raises(PluginError) as e:
        c.diff(missing, "")
    assert missing in e.value.message
    with pytest.raises(PluginError) as e:
        c.call("GraphDriver.NoSuchCall")
    assert e.value.status == 404 and "NoSuchCall" in e.value.message
    # the keep-alive connection still works after all of these
    assert c.call("GraphDriver.Exists", {"ID": missing}) == {"Exists": False}


def test_init_refuses_options_it_does_not_support(plugin, tmp_path):
    with pytest.raises(PluginError) as e:
        plugin.call("GraphDriver.Init", {"Home": str(tmp_path / "h"), "Opts": ["size=1G"]})
    assert "size=1G" in e.value.message
    with pytest.raises(PluginError) as e:
        plugin.call("GraphDriver.Init", {"Home": str(tmp_path / "h"), "UIDMaps": [
            {"container_id": 0, "host_id": 100000, "size": 65536}]})
    assert "userns-remap" in e.value.message
    with pytest.raises(PluginError) as e:
        plugin.call("GraphDriver.Create", {"ID": new_id()})
    assert "Init" in e.value.message
    status = dict(map(tuple, plugin.call("GraphDriver.Status")["Status"]))
    assert status.get("Initialised") == "false"


def test_hostile_apply_diff_is_refused_and_the_connection_recovers(inited, tmp_path):
    c = inited
    layer = new_id()
    c.call("GraphDriver.Create", {"ID": layer})
    outside = tmp_path / "outside"
    outside.mkdir()
    # the bad entry comes early; dockerd is still sending megabytes when it is refused,
    # and must get the error answer, not a broken pipe
    evil = (TarBuilder().file("fine", b"x" * 100_000).symlink("link", str(outside))
            .file("link/evil", b"x").file("after", os.urandom(8 << 20)).bytes())
    with pytest.raises(PluginError) as e:
        c.apply_diff(layer, "", evil)
    assert "'link/evil'" in e.value.message and layer in e.value.message
    assert os.listdir(outside) == []
    assert c.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
    # dockerd reuses its connection: the next call must work
    assert c.call("GraphDriver.Remove", {"ID": layer}) == {}
    c.call("GraphDriver.Create", {"ID": layer})
    assert c.apply_diff(layer, "", TarBuilder().file("ok", b"ok").bytes()) == {"Size": 2}


def test_apply_diff_body_with_chunk_extensions_and_trailers(inited):
    """Raw HTTP: chunk extensions, a trailer, then a second request on the same connection."""
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data = TarBuilder().file("f", b"0123456789" * 1000).bytes()
    body = b""
    for i in range(0, len(data), 3000):
        piece = data[i : i + 3000]
        body += b"%X;note=piece%d\r\n" % (len(piece), i) + piece + b"\r\n"
    body += b"0\r\nX-Checksum: none\r\n\r\n"
    head = (f"POST /GraphDriver.ApplyDiff?id={layer}&parent= HTTP/1.1\r\n"
            "Host: plugin\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/x-tar\r\n\r\n").encode()
    second = (b"POST /GraphDriver.Exists HTTP/1.1\r\nHost: plugin\r\n"
              b"Content-Length: %d\r\n\r\n" % len(f'{{"ID": "{layer}"}}') +
              f'{{"ID": "{layer}"}}'.encode())
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(inited.path)
        s.sendall(head + body + second)
        f = s.makefile("rb")
        answers = []
        for _ in range(2):
            status = f.readline()
            headers = {}
            while True:
                line = f.readline().strip()
                if not line:
                    break
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            answers.append((status, f.read(int(headers["content-length"]))))
    assert answers[0][0].startswith(b"HTTP/1.1 200")
    assert answers[0][1].strip() == b'{"Size": 10000}'
    assert answers[1][1].strip() == b'{"Exists": true}'


def test_parallel_apply_diff_of_8_layers(inited):
    base = new_id()
    inited.call("GraphDriver.Create", {"ID": base})
    inited.apply_diff(base, "", TarBuilder().dir("shared").bytes())
    layers = [new_id() for _ in range(8)]
    payloads = {layer: os.urandom(512 * 1024) for layer in layers}
    results, errors = {}, []

    def pull(layer: str) -> None:
        client = PluginClient(inited.path)  # dockerd uses several connections
        try:
            client.call("GraphDriver.Create", {"ID": layer, "Parent": base})
            data = (TarBuilder().file(f"shared/{layer}", payloads[layer])
                    .file("common", layer.encode()).bytes())
            results[layer] = client.apply_diff(layer, base, data, chunk=16 * 1024)["Size"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((layer, e))
        finally:
            client.close()

    threads = [threading.Thread(target=pull, args=(layer,)) for layer in layers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert results == {layer: 512 * 1024 + 64 for layer in layers}
    for layer in layers:
        view = inited.call("GraphDriver.Get", {"ID": layer})["Dir"]
        with open(os.path.join(view, "shared", layer), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payloads[layer]).digest()
        assert sorted(os.listdir(os.path.join(view, "shared"))) == [layer]
        with open(os.path.join(view, "common"), "rb") as f:
            assert f.read() == layer.encode()
        inited.call("GraphDriver.Put", {"ID": layer})


def test_apply_diff_with_content_length_body(inited):
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data = TarBuilder().file("f", b"abc").bytes()
    conn = inited.conn
    conn.request("POST", f"/GraphDriver.ApplyDiff?id={layer}&parent=", body=data,
                  headers={"Content-Length": str(len(data))})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read().strip() == b'{"Size": 3}'
    assert inited.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": True}


def test_client_going_away_mid_body_leaves_no_layer_and_server_keeps_serving(inited, tmp_path):
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data = TarBuilder().file("big", os.urandom(1 << 20)).bytes()
    head = (f"POST /GraphDriver.ApplyDiff?id={layer}&parent= HTTP/1.1\r\n"
            "Host: plugin\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(inited.path)
        s.sendall(head + b"%x\r\n" % len(data) + data[:300_000])  # then dockerd dies
    marker = tmp_path / "home" / layer / ".applying"
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:  # the server got the request
        time.sleep(0.01)
    fresh = PluginClient(inited.path)
    try:
        assert fresh.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
        # dockerd, restarted, removes the partial layer and pulls it again: Remove waits for
        # the abandoned ApplyDiff to give up, it must not hang
        assert fresh.call("GraphDriver.Remove", {"ID": layer}) == {}
        fresh.call("GraphDriver.Create", {"ID": layer})
        assert fresh.apply_diff(layer, "", data) == {"Size": 1 << 20}
        assert fresh.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": True}
    finally:
        fresh.close()


# ---------------------------------------------------------------------------- broken requests
# (issue 11) Raw HTTP, as a broken or hostile client sends it: every one gets an answer
# that names its problem, leaves no layer behind, and the server serves on.


def exchange(path: str, data: bytes, half_close: bool = True,
             timeout: float = 30) -> Tuple[int, Dict[str, str], Dict[str, object]]:
    """Send raw bytes (then, by default, end our side as a client that goes away does, but
    still reads), and read the one answer: status, headers (lower-case), JSON body."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        raw = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, json.loads(raw)


def apply_head(layer: str, framing: str) -> bytes:
    return (f"POST /GraphDriver.ApplyDiff?id={layer}&parent= HTTP/1.1\r\nHost: plugin\r\n"
            f"{framing}\r\n\r\n").encode()


def two_file_tar() -> Tuple[bytes, int]:
    """A layer tar, and the offset where its second entry starts: cut there, the rest
    reads as a complete, smaller layer."""
    data = TarBuilder().file("a", b"a" * 100).file("b", b"b" * 100).bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return data, t.getmembers()[1].offset


def assert_no_layer_and_still_serving(c: PluginClient, layer: str, tmp_path) -> None:
    fresh = PluginClient(c.path)
    try:
        assert fresh.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
        assert mounts_below(str(tmp_path)) == []
        assert fresh.call("GraphDriver.Remove", {"ID": layer}) == {}  # as dockerd cleans up
        fresh.call("GraphDriver.Create", {"ID": layer})
        assert fresh.apply_diff(layer, "", TarBuilder().file("ok", b"ok").bytes()) == {"Size": 2}
    finally:
        fresh.close()


def test_content_length_body_cut_short_at_an_entry_boundary_fails_and_leaves_no_layer(
        inited, tmp_path):
    """Finding 5: the client goes away after whole tar entries; what arrived parses as a
    complete tar, but it is not the body the client announced."""
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data, cut = two_file_tar()
    status, headers, body = exchange(
        inited.path, apply_head(layer, f"Content-Length: {len(data)}") + data[:cut])
    assert status == 400 and headers.get("connection") == "close"
    assert f"ended after {cut} of its {len(data)} bytes (Content-Length)" in body["Err"]
    assert layer in body["Err"]
    assert_no_layer_and_still_serving(inited, layer, tmp_path)


def test_chunked_body_without_its_last_chunk_fails_and_leaves_no_layer(inited, tmp_path):
    """The whole tar, even its end-of-archive blocks, but not the 0-chunk that ends the
    body: the client went away, the body is not known to be complete."""
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data, _ = two_file_tar()
    status, headers, body = exchange(
        inited.path, apply_head(layer, "Transfer-Encoding: chunked")
        + b"%x\r\n" % len(data) + data + b"\r\n")
    assert status == 400 and headers.get("connection") == "close"
    assert "request body ended before the last chunk" in body["Err"] and layer in body["Err"]
    assert_no_layer_and_still_serving(inited, layer, tmp_path)


def test_body_broken_after_the_end_of_the_tar_leaves_no_layer(inited, tmp_path):
    """The tar ends well before the body does, and the body then breaks: the layer is
    complete only once the whole body has arrived (driver.apply_diff reads it to its end
    before removing .applying)."""
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data, _ = two_file_tar()
    data += bytes(2 << 20)  # more than the tar reader reads ahead after the end blocks
    status, _, body = exchange(inited.path, apply_head(layer, "Transfer-Encoding: chunked")
                               + b"%x\r\n" % len(data) + data + b"\r\n")
    assert status == 400 and "before the last chunk" in body["Err"]
    assert_no_layer_and_still_serving(inited, layer, tmp_path)


def post(method: str, framing: str, body: bytes = b"") -> bytes:
    return (f"POST /{method} HTTP/1.1\r\nHost: plugin\r\n{framing}\r\n\r\n").encode() + body


def assert_refused(answer, status: int, *words: str) -> None:
    got, headers, body = answer
    assert got == status, body
    assert headers.get("content-type") == "application/vnd.docker.plugins.v1+json"
    for word in words:
        assert word in body["Err"], body["Err"]


@pytest.mark.parametrize("value", ["abc", "-1", "+2", "1e3", "0x10", "1_0", "", "2 2",
                                   "9223372036854775808", "9" * 40, "\uff12"])
def test_a_malformed_content_length_is_answered_400_naming_it(inited, value, tmp_path):
    """Finding 7: a Content-Length int() cannot read dropped the connection unanswered;
    one it could ('-1', '1_0', '+2') framed the body wrongly (the rest became the next
    request); a huge one made a 500. Each is a 400 naming the header, and the server
    serves on (the caller's own keep-alive connection too)."""
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    framing = "Content-Length: " + value
    for method in ("GraphDriver.Exists", f"GraphDriver.ApplyDiff?id={layer}"):
        status, headers, body = exchange(inited.path, post(method, framing, b"{}"))
        assert status == 400 and "Content-Length" in body["Err"], body
        assert headers.get("connection") == "close"
    assert os.listdir(tmp_path / "home" / layer / "diff") == []  # nothing was applied
    assert inited.apply_diff(layer, "", TarBuilder().file("ok", b"ok").bytes()) == {"Size": 2}


@pytest.mark.parametrize("framing, status, words", [
    ("Transfer-Encoding: gzip, chunked", 501, "Transfer-Encoding 'gzip, chunked'"),
    ("Transfer-Encoding: chunked\r\nContent-Length: 2", 400, "both Transfer-Encoding and"),
    ("Content-Length: 2\r\nContent-Length: 3", 400, "conflicting Content-Length"),
    (f"Content-Length: {(1 << 20) + 1}", 413, "larger than 1048576"),
])
def test_unframeable_or_oversized_bodies_are_refused_before_reading_them(inited, framing,
                                                                        status, words):
    """No byte of such a body is read (the answer comes while the client still holds it)."""
    answer = exchange(inited.path, post("GraphDriver.Exists", framing), half_close=False)
    assert_refused(answer, status, "GraphDriver.Exists", words)
    assert answer[1].get("connection") == "close"
    assert inited.call("GraphDriver.Exists", {"ID": new_id()}) == {"Exists": False}


@pytest.mark.parametrize("chunks, status, words", [
    (b"-2\r\n{}\r\n0\r\n\r\n", 400, "malformed chunk header"),  # read to the end before
    (b"0x2\r\n{}\r\n0\r\n\r\n", 400, "malformed chunk header"),
    (b"FFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n", 400, "malformed chunk header"),  # MemoryError
    (b"1\r\n{}\r\n0\r\n\r\n", 400, "not followed by CRLF"),
    (b"100001\r\n" + b" " * 0x100001 + b"\r\n0\r\n\r\n", 413, "larger than 1048576"),
])
def test_malformed_or_oversized_chunked_bodies_are_answered_naming_the_problem(
        inited, chunks, status, words):
    answer = exchange(inited.path, post("GraphDriver.Exists", "Transfer-Encoding: chunked",
                                        chunks))
    assert_refused(answer, status, "GraphDriver.Exists", words)
    assert answer[1].get("connection") == "close"
    assert inited.call("GraphDriver.Exists", {"ID": new_id()}) == {"Exists": False}


@pytest.mark.parametrize("method, body, words", [
    ("GraphDriver.Create", b"[]", "must be a JSON object, not an array"),
    ("GraphDriver.Create", b"null", "must be a JSON object, not null"),
    ("GraphDriver.Create", b"{nope", "is not JSON"),
    ("GraphDriver.Create", b'{"ID": "\xff"}', "is not JSON"),
    ("GraphDriver.Create", b"[" * 200_000, "nests JSON too deeply"),  # was a 500
    ("GraphDriver.Create", b'{"ID": 42}', "field ID must be a string, not a number"),
    ("GraphDriver.Get", b'{"ID": "%s", "MountLabel": []}' % new_id().encode(),
     "field MountLabel must be a string, not an array"),
    ("GraphDriver.Exists", b'{"ID": {"a": 1}}', "field ID must be a string, not an object"),
    ("GraphDriver.Create", b'{"ID": "%s", "StorageOpt": 5}' % new_id().encode(),  # was a 500
     "field StorageOpt must be an object or null, not a number"),
    ("GraphDriver.CreateReadWrite", b'{"ID": "%s", "StorageOpt": ["size"]}' % new_id().encode(),
     "field StorageOpt must be an object or null, not an array"),
    ("GraphDriver.Init", b'{"Home": "/tmp/x", "Opts": "size=1G"}',
     "field Opts must be an array or null, not a string"),
    ("GraphDriver.Init", b'{"Home": "/tmp/x", "UIDMaps": true}',
     "field UIDMaps must be an array or null, not true/false"),
])
def test_json_bodies_of_the_wrong_shape_are_answered_400_naming_the_field(inited, method,
                                                                        body, words):
    """Finding 7: such bodies made 500s (a TypeError, a RecursionError) or a 200 error; a
    request that cannot be what dockerd sends is a 400 that says what is wrong. The
    connection stays usable: the body was read to its end."""
    c = inited
    c.conn.request("POST", f"/{method}", body=body,
                   headers={"Content-Length": str(len(body))})
    resp = c.conn.getresponse()
    err = json.loads(resp.read())["Err"]
    assert resp.status == 400 and method in err and words in err, (resp.status, err)
    assert resp.getheader("Connection") != "close"
    assert c.call("GraphDriver.Exists", {"ID": new_id()}) == {"Exists": False}


@pytest.mark.parametrize("request_line, status, words", [
    (b"GET /GraphDriver.Exists HTTP/1.1", 405, "'GET' is not a plugin call"),
    (b"DELETE /GraphDriver.Remove HTTP/1.1", 405, "'DELETE' is not a plugin call"),
    (b"garbage", 400, "Bad request syntax"),
    (b"POST /x HTTP/9.9", 505, "Invalid HTTP version"),
    # HTTP/0.9 (no status line in http.server's answer) and below 1.0: a 505 with one
    (b"POST /Plugin.Activate HTTP/0.9", 505, "'HTTP/0.9' is not supported"),
    (b"POST /Plugin.Activate HTTP/0.5", 505, "'HTTP/0.5' is not supported"),
    (b"POST /Plugin.Activate HTTP/00.99", 505, "'HTTP/00.99' is not supported"),
    (b"POST /Plugin.Activate", 505, "no HTTP version"),
    (b"GET /Plugin.Activate", 505, "no HTTP version"),
])
def test_requests_that_are_not_plugin_calls_are_answered_as_errors(inited, request_line,
                                                                 status, words):
    """The standard library's own refusals come as dockerd reads errors ({"Err": ...}),
    with a status line even for a request line too garbled to name an HTTP version."""
    answer = exchange(inited.path, request_line + b"\r\nHost: plugin\r\n\r\n")
    assert_refused(answer, status, words)
    if status == 405:
        assert answer[1].get("allow") == "POST"
    assert inited.call("GraphDriver.Exists", {"ID": new_id()}) == {"Exists": False}



# ---------------------------------------------------------------------------- stuck clients
# (issue 11, finding 9) A connection pins a thread: an idle or half-sent one may not pin it
# forever, and the connections served at once are bounded. The timeouts are shortened
# here (server.REQUEST_TIMEOUT, server.STREAM_TIMEOUT are read when used; raising=False
# lets these tests run against a server that has none, to show what it did).


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request" in t.name)


def closed_within(sock: socket.socket, seconds: float) -> float:
    """How long until the server closes `sock` (its side), failing after `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {seconds} s")
    return time.monotonic() - start


def test_an_idle_or_half_sent_request_is_closed_after_the_request_timeout(inited,
                                                                          monkeypatch):
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.5, raising=False)
    idle = socket.socket(socket.AF_UNIX)
    half = socket.socket(socket.AF_UNIX)
    try:
        idle.connect(inited.path)
        half.connect(inited.path)
        half.sendall(b"POST /GraphDriver.Exists HTTP/1.1\r\nHost: plugin\r\n")  # no end
        assert closed_within(idle, 10) < 5
        assert closed_within(half, 10) < 5
    finally:
        idle.close()
        half.close()
    fresh = PluginClient(inited.path)  # inited's own connection was closed too, idle
    try:
        assert fresh.call("GraphDriver.Exists", {"ID": new_id()}) == {"Exists": False}
    finally:
        fresh.close()


def test_a_json_body_that_stops_coming_is_answered_408(inited, monkeypatch):
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.5, raising=False)
    status, headers, body = exchange(
        inited.path, post("GraphDriver.Exists", "Content-Length: 40", b'{"ID": '),
        half_close=False, timeout=10)
    assert status == 408 and headers.get("connection") == "close"
    assert "GraphDriver.Exists: request body: nothing arrived for 0.5 s" in body["Err"]


def test_an_apply_diff_body_may_pause_longer_than_a_request_but_not_without_end(
        inited, tmp_path, monkeypatch):
    """A layer body pausing (a client's upload stalling) is waited for, up to
    STREAM_TIMEOUT of silence; then the call fails, 408, and leaves no layer."""
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.3, raising=False)
    monkeypatch.setattr(server, "STREAM_TIMEOUT", 1.5, raising=False)
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer})
    data, cut = two_file_tar()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(inited.path)
        s.sendall(apply_head(layer, "Transfer-Encoding: chunked") + b"%x\r\n" % len(data)
                  + data[:cut])
        time.sleep(1)  # more than REQUEST_TIMEOUT: still waited for
        s.sendall(data[cut:cut + 512])
        start = time.monotonic()
        resp = http.client.HTTPResponse(s)
        resp.begin()  # then nothing: answered once STREAM_TIMEOUT has passed
        waited = time.monotonic() - start
        err = json.loads(resp.read())["Err"]
    assert resp.status == 408 and 1.4 < waited < 10, (resp.status, waited)
    assert "nothing arrived for 1.5 s" in err and layer in err
    fresh = PluginClient(inited.path)  # inited's own connection was closed, idle
    try:
        assert fresh.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
    finally:
        fresh.close()
    assert mounts_below(str(tmp_path)) == []


def test_connections_beyond_the_limit_wait_for_one_to_close(as_root, monkeypatch, caplog):
    """At the limit, a new connection is not refused (dockerd would fail its call): it
    waits, unserved, and is served as soon as another closes. Threads stay bounded."""
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 60, raising=False)  # idle ones stay
    sockdir = tempfile.mkdtemp(prefix="cgd-", dir="/tmp")
    path = os.path.join(sockdir, "cap.sock")
    srv = server.PluginServer(sockets.bind_socket(path), Driver(Config()), max_connections=4)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    before = handler_threads()
    idle = []
    answered = threading.Event()
    try:
        for _ in range(30):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)  # accepted by the kernel (backlog), served or not
            idle.append(s)
        time.sleep(0.5)
        assert handler_threads() - before == 4  # 30 connections, 4 threads
        assert "4 connections are open, the most this daemon serves at once" in caplog.text

        def activate() -> None:
            c = PluginClient(path)
            try:
                assert c.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
                answered.set()
            finally:
                c.close()

        waiting = threading.Thread(target=activate, daemon=True)
        waiting.start()
        assert not answered.wait(1)  # all slots taken by idle connections
        for s in idle:  # the idle ones go away
            s.close()
        assert answered.wait(10)
        waiting.join(10)
    finally:
        for s in idle:
            s.close()
        shutdown = threading.Thread(target=srv.shutdown, daemon=True)
        shutdown.start()
        shutdown.join(10)
        assert not shutdown.is_alive(), "shutdown hung"
        srv.server_close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_shutdown_is_not_held_up_by_a_connection_waiting_for_a_slot(as_root):
    sockdir = tempfile.mkdtemp(prefix="cgd-", dir="/tmp")
    path = os.path.join(sockdir, "cap.sock")
    srv = server.PluginServer(sockets.bind_socket(path), Driver(Config()), max_connections=1)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    held = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    try:
        for s in held:
            s.connect(path)
        time.sleep(0.3)  # the second waits for the first's slot
        start = time.monotonic()
        srv.shutdown()
        assert time.monotonic() - start < 5
        t.join(5)
        assert not t.is_alive()
    finally:
        for s in held:
            s.close()
        srv.server_close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_a_call_that_moved_a_layers_worth_gives_freed_memory_back(inited, monkeypatch):
    """After an ApplyDiff or a Diff of RELEASE_AFTER_BYTES or more (their buffers freed),
    and only then, the server gives the heap's free memory back, once the answer is sent;
    a body that fails midway counts what it moved."""
    released = []
    monkeypatch.setattr(server, "release_free_memory", lambda: released.append(1))
    monkeypatch.setattr(server, "RELEASE_AFTER_BYTES", 1 << 20)
    small = new_id()
    inited.call("GraphDriver.Create", {"ID": small, "Parent": ""})
    inited.apply_diff(small, "", TarBuilder().file("f", b"x" * 1000).bytes())
    inited.call("GraphDriver.Exists", {"ID": small})
    assert released == []

    big = new_id()
    inited.call("GraphDriver.Create", {"ID": big, "Parent": ""})
    inited.apply_diff(big, "", TarBuilder().file("f", os.urandom(2 << 20)).bytes())
    inited.call("GraphDriver.Exists", {"ID": big})  # the release follows the answer
    assert released == [1]
    data, resp = inited.diff(big)
    assert len(data) > 2 << 20 and resp.status == 200
    inited.call("GraphDriver.Exists", {"ID": big})  # the Diff's release is done by then
    assert released == [1, 1]

    broken = new_id()
    inited.call("GraphDriver.Create", {"ID": broken, "Parent": ""})
    with pytest.raises(PluginError):  # not a tar: refused after its body is read
        inited.apply_diff(broken, "", os.urandom(3 << 20))
    inited.call("GraphDriver.Exists", {"ID": broken})
    assert released == [1, 1, 1]


def test_a_large_json_answer_counts_too(inited, monkeypatch):
    """A Changes of many files answers megabytes of JSON: counted like a body."""
    released = []
    monkeypatch.setattr(server, "release_free_memory", lambda: released.append(1))
    layer = new_id()
    inited.call("GraphDriver.Create", {"ID": layer, "Parent": ""})
    tar = TarBuilder()
    for i in range(100):
        tar.file(f"file-{i:03}", b"x")
    inited.apply_diff(layer, "", tar.bytes())  # 100 KiB: below the 8 MiB
    inited.call("GraphDriver.Exists", {"ID": layer})  # once its handling has ended
    monkeypatch.setattr(server, "RELEASE_AFTER_BYTES", 2000)
    inited.call("GraphDriver.Exists", {"ID": layer})
    assert released == []
    assert len(inited.call("GraphDriver.Changes", {"ID": layer, "Parent": ""})["Changes"]) == 100
    inited.call("GraphDriver.Exists", {"ID": layer})  # the release follows the answer
    assert released == [1]
