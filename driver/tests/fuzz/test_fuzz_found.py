"""The bugs the fuzzers found, each as a minimal regression test (the fuzzers carry them
as @example cases too, where the bug is fixed)."""

from __future__ import annotations

import io
import json
import os

import pytest

from cvmfs_graphdriver import archive, thin, whiteouts

HEX = "0123456789abcdef" * 4


def test_a_descriptor_nested_too_deeply_is_a_descriptor_error():
    for data in (b"[" * 100_000, b'{"version": "1.0", "layers": ' + b"[" * 100_000):
        with pytest.raises(thin.DescriptorError, match="nests JSON too deeply"):
            thin.parse_descriptor(data, None)


@pytest.mark.parametrize("entry", [{"url": "cvmfs://test.repo\n/layers/x"},
                                   {"repo": "test.repo\n", "digest": HEX},
                                   {"repo": "test.repo", "digest": HEX + "\n"},
                                   {"url": "cvmfs://test.repo/x",
                                    "digest": "sha256:" + HEX + "\n"}])
def test_a_trailing_newline_is_no_part_of_a_repository_name_or_digest(entry):
    data = json.dumps({"version": "1.0", "layers": [entry]}).encode()
    with pytest.raises(thin.DescriptorError, match="invalid"):
        thin.parse_descriptor(data, None)


@pytest.mark.root
def test_a_whiteout_of_a_name_of_255_bytes_round_trips(tmp_path):
    name = "n" * 255
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    whiteouts.make_whiteout(str(src / name))
    out = io.BytesIO()
    archive.write_layer_tar(out, str(src))
    archive.apply_tar(io.BytesIO(out.getvalue()), str(dst), whiteouts.OverlayUpper())
    assert whiteouts.is_whiteout(os.lstat(dst / name))


@pytest.mark.root
@pytest.mark.parametrize("line, words", [
    (b"POST /Plugin.Activate HTTP/0.9", "'HTTP/0.9' is not supported"),
    (b"POST /Plugin.Activate HTTP/0.1", "'HTTP/0.1' is not supported"),
    (b"POST /Plugin.Activate", "no HTTP version"),  # an HTTP/0.9 simple request
])
def test_a_full_request_line_of_http_0_9_is_answered_with_a_status_line(plugin_socket, line,
                                                                         words):
    """server.Handler took 'HTTP/0.9' in a full request line as the request's version and
    answered in http.server's 0.9 mode: the JSON body with no status line and no headers
    (http.client.BadStatusLine). A version below 1.0, or none, is a 505 with a status
    line and the {"Err": ...} body of every refusal."""
    from test_fuzz_requests import exchange

    answer = exchange(plugin_socket, line + b"\r\nContent-Length: 0\r\n\r\n")
    assert answer is not None and answer[0] in (200, 400, 505)
    status, headers, raw = answer
    assert status == 505, raw
    assert headers.get("content-type") == "application/vnd.docker.plugins.v1+json"
    assert words in json.loads(raw)["Err"], raw
    ok = exchange(plugin_socket, b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert ok is not None and ok[0] == 200
