"""Fuzzing request parsing: raw HTTP/1.1 requests to a real PluginServer on a unix
socket, and raw or random protobuf messages to the snapshotter's gRPC service in process.

HTTP: every request is answered with a well-formed HTTP response, never a 5xx but the
protocol's own 501 (a Transfer-Encoding it does not implement) and 505 (an HTTP version
it does not speak), or the connection is closed cleanly; a well-formed call still works
afterwards; no handler thread or descriptor is left. gRPC: only the codes the service
maps its errors to (InvalidArgument, NotFound, ...) come back, never UNKNOWN from an
unexpected exception, and INTERNAL only as gRPC's own answer to bytes that are no
protobuf message.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
from typing import Optional, Tuple

import pytest
from fuzzkit import examples, open_fds, settle, threads
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.root

LAYER = "ab" * 32
METHODS = ["Plugin.Activate", "GraphDriver.Capabilities", "GraphDriver.Create",
           "GraphDriver.CreateReadWrite", "GraphDriver.Remove", "GraphDriver.Get",
           "GraphDriver.Put", "GraphDriver.Exists", "GraphDriver.Status",
           "GraphDriver.GetMetadata", "GraphDriver.Changes", "GraphDriver.DiffSize",
           "GraphDriver.Diff", "GraphDriver.ApplyDiff", "VolumeDriver.Create", "Nope",
           "GraphDriver.Init"]  # Init: only bodies whose Home is no string (see below)
FIELDS = ["ID", "Parent", "MountLabel", "StorageOpt", "Opts", "UIDMaps", "Home", "Name"]
IDS = st.sampled_from([LAYER, "", "../x", "a" * 65, "/etc", "x\x00", LAYER + "-init", "é"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | IDS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def bodies(draw: st.DrawFn, method: str) -> bytes:
    shape = draw(st.sampled_from(["object", "object", "value", "bytes", "empty", "deep"]))
    if shape == "object":
        doc = draw(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES | IDS, max_size=4))
        if method == "GraphDriver.Init" and isinstance(doc.get("Home", 0), str) or \
                method == "GraphDriver.Init" and doc.get("Home") is None:
            doc["Home"] = 7  # a Home that is a path would have the test's driver re-homed
        return json.dumps(doc).encode()
    if method == "GraphDriver.Init":
        return b"[]"
    if shape == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    if shape == "bytes":
        return draw(st.binary(max_size=200))
    if shape == "deep":
        return b"[" * draw(st.integers(1, 50_000))
    return b""


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    body = draw(bodies(method))
    verb = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "post", "", "P\x00ST"]))
    target = draw(st.sampled_from([f"/{method}"] * 6 + [
        f"/{method}?id={LAYER}&parent=", f"/{method}?id=../x", "//[x", "*", "/", "",
        f"/{method}?%zz", "http://h/" + method, "/" + "a" * 70000]))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.x",
                                                       "HTTP/0.9", "HTTP/0.5", ""]))
    line = " ".join(x for x in (verb, target, version) if x or draw(st.booleans()))
    headers = ["Host: plugin"]
    framing = draw(st.sampled_from(["length"] * 4 + ["chunked"] * 2 + [
        "none", "bad-length", "two-lengths", "te-and-length", "te-other", "bad-chunks"]))
    if framing == "length":
        headers.append(f"Content-Length: {len(body)}")
    elif framing == "bad-length":
        headers.append("Content-Length: " + draw(st.sampled_from(
            ["-1", "+5", "0x10", "1_0", "99999999999999999999", " ", "5 5", str(len(body) + 9),
             str(max(len(body) - 3, 0))])))
    elif framing == "two-lengths":
        headers += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
    elif framing == "te-and-length":
        headers += ["Transfer-Encoding: chunked", f"Content-Length: {len(body)}"]
    elif framing == "te-other":
        headers.append("Transfer-Encoding: " + draw(st.sampled_from(
            ["gzip", "gzip, chunked", "", ",", "identity", "chunked, chunked"])))
    if framing in ("chunked", "bad-chunks", "te-and-length"):
        headers.append("Transfer-Encoding: chunked") if framing != "te-and-length" else None
        size = len(body)
        if framing == "bad-chunks":
            chunk_head = draw(st.sampled_from([b"-1", b"0x5", b"zz", b"ffffffffffffffffff",
                                               b"%x" % (size + 1), b"", b"1;ext=" + b"e" * 5000]))
            body = chunk_head + b"\r\n" + body + draw(st.sampled_from([b"", b"\r\n", b"xx"]))
        else:
            body = (b"%x;ext=1\r\n" % size + body + b"\r\n" if body else b"") + b"0\r\n" + \
                draw(st.sampled_from([b"", b"Trailer: x\r\n"])) + b"\r\n"
    headers += draw(st.lists(st.sampled_from(
        ["X-A: b", "Bad Header", "X-Long: " + "v" * 70000, ":empty", "Expect: 100-continue",
         "Connection: close", "Connection: keep-alive", "\tfolded"]), max_size=2))
    head = (line + "\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode("utf-8",
                                                                     "surrogateescape")
    return head + body


def exchange(path: str, data: bytes) -> Optional[Tuple[int, dict, bytes]]:
    """Send `data`, end our side, read one answer; None if closed without one."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered (and closed) before taking all of it: read that answer
        first = s.recv(1, socket.MSG_PEEK)
        if not first:
            return None
        resp = http.client.HTTPResponse(s)
        resp.begin()  # raises on a malformed status line or headers
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw


@settings(max_examples=examples(200))
@given(data=requests())
@example(data=b"POST /GraphDriver.Exists HTTP/1.1\r\nContent-Length: 3\r\n\r\n[[[")
@example(data=b"POST /Plugin.Activate HTTP/0.9\r\nContent-Length: 0\r\n\r\n")
def test_http_requests_are_answered_or_closed_and_the_server_keeps_serving(
        plugin_socket, tally, data):
    before_threads, before_fds = threads(), open_fds()
    answer = exchange(plugin_socket, data)
    if answer is not None:
        status, headers, raw = answer
        assert 200 <= status < 600
        assert status < 500 or status in (501, 505), (status, raw[:300])
        if headers.get("content-type", "").startswith("application/vnd.docker"):
            body = json.loads(raw)
            assert isinstance(body, dict)
            refused = status >= 400 or bool(body.get("Err"))
        else:
            refused = status >= 400
    else:
        refused = True
    tally.hostile(refused=refused)
    ok = exchange(plugin_socket, b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert ok is not None and ok[0] == 200 and json.loads(ok[2]) == {
        "Implements": ["GraphDriver"]}
    leaked_threads = settle(threads, before_threads) - before_threads
    leaked_fds = settle(open_fds, before_fds) - before_fds
    if leaked_threads > 0 or leaked_fds > 0:
        tally.leaks(max(leaked_threads, 0) + max(leaked_fds, 0))
    assert leaked_threads <= 0 and leaked_fds <= 0, (leaked_threads, leaked_fds)


# ---------------------------------------------------------------------------- gRPC

GRPC_METHODS = ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage",
                "Cleanup"]
KEYS = st.sampled_from(["k", "", "a/b", "..", "k\x00", "x" * 5000, "é", "default/1/k",
                        "sha256:" + "0" * 64])
LABELS = st.dictionaries(st.sampled_from(["l", "", "containerd.io/gc.root", "x" * 5000,
                                          "containerd.io/snapshot/cvmfs"]),
                         st.sampled_from(["v", "", "x" * 5000, "\x00"]), max_size=3)


@pytest.fixture(scope="module")
def grpc_channel(tmp_path_factory):
    import grpc  # the snapshotter extra, in the test extra too

    from cvmfs_graphdriver.snapshotter import service
    from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

    home = str(tmp_path_factory.mktemp("sn-home"))
    sn = OverlaySnapshotter(home, sync_commits=False)
    server = service.build_server(sn, max_workers=4)
    sockdir = tempfile.mkdtemp(prefix="cgd-fg-", dir="/tmp")
    path = os.path.join(sockdir, "s.sock")
    assert server.add_insecure_port(f"unix:{path}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{path}")
    yield grpc, channel
    channel.close()
    server.stop(5).wait()
    sn.close()
    shutil.rmtree(sockdir, ignore_errors=True)


@st.composite
def grpc_calls(draw: st.DrawFn) -> Tuple[str, bytes]:
    from google.protobuf import field_mask_pb2

    from cvmfs_graphdriver.snapshotter.api import snapshots_pb2 as pb

    method = draw(st.sampled_from(GRPC_METHODS + ["List"]))
    if draw(st.integers(0, 4)) == 0:
        return method, draw(st.binary(max_size=100))
    key, parent, labels = draw(KEYS), draw(KEYS), draw(LABELS)
    msg = {
        "Prepare": lambda: pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels),
        "View": lambda: pb.ViewSnapshotRequest(key=key, parent=parent, labels=labels),
        "Mounts": lambda: pb.MountsRequest(key=key),
        "Commit": lambda: pb.CommitSnapshotRequest(name=parent, key=key, labels=labels),
        "Remove": lambda: pb.RemoveSnapshotRequest(key=key),
        "Stat": lambda: pb.StatSnapshotRequest(key=key),
        "Update": lambda: pb.UpdateSnapshotRequest(
            info=pb.Info(name=key, labels=labels, kind=draw(st.integers(0, 5))),
            update_mask=field_mask_pb2.FieldMask(paths=draw(st.lists(st.sampled_from(
                ["labels", "labels.l", "name", "", "kind", "labels.\x00"]), max_size=2)))),
        "Usage": lambda: pb.UsageRequest(key=key),
        "Cleanup": lambda: pb.CleanupRequest(),
        "List": lambda: pb.ListSnapshotsRequest(filters=draw(st.lists(st.sampled_from(
            ["name==k", "kind==active", "labels.l", "labels.\"l\"==v", "name~=^k", "name~=[",
             "(", ",", "parent!=", "labels.x==\"", "a==b==c", "name~=/(/"]), max_size=2))),
    }[method]()
    raw = msg.SerializeToString()
    if draw(st.integers(0, 3)) == 0 and raw:  # a damaged message
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    return method, raw


@settings(max_examples=examples(200))
@given(call=grpc_calls())
def test_grpc_requests_get_the_services_own_codes(grpc_channel, tally, call):
    grpc, channel = grpc_channel
    method, raw = call
    path = f"/containerd.services.snapshots.v1.Snapshots/{method}"
    try:
        if method == "List":
            list(channel.unary_stream(path)(raw, timeout=30))
        else:
            channel.unary_unary(path)(raw, timeout=30)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        assert code != grpc.StatusCode.UNKNOWN, details
        assert code != grpc.StatusCode.INTERNAL or details == \
            "Exception deserializing request!", details
        tally.hostile(refused=True)
        return
    tally.hostile(refused=False)
