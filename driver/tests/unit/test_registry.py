"""cvmfs-thin's registry client: references as Docker normalises them, manifests and
manifest lists, and the anonymous bearer-token dance, against a small local HTTP server
that behaves as Docker Hub does (401 with a challenge, then a token)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cvmfs_graphdriver.publish import registry
from cvmfs_graphdriver.publish.stores import PublishError


@pytest.mark.parametrize("ref,want", [
    ("busybox", ("docker.io", "library/busybox", "latest")),
    ("python:3.12", ("docker.io", "library/python", "3.12")),
    ("user/app:v1", ("docker.io", "user/app", "v1")),
    ("127.0.0.1:5000/app:1", ("127.0.0.1:5000", "app", "1")),
    ("localhost/a/b", ("localhost", "a/b", "latest")),
    ("reg.example.org/x/y@sha256:" + "a" * 64, ("reg.example.org", "x/y", "sha256:" + "a" * 64)),
])
def test_references_are_normalised_as_docker_does(ref, want):
    r = registry.parse_reference(ref)
    assert (r.registry, r.repository, r.reference) == want


def test_loopback_registries_are_plain_http_others_https():
    assert registry.parse_reference("127.0.0.1:5000/a").scheme == "http"
    assert registry.parse_reference("localhost:5000/a").scheme == "http"
    assert registry.parse_reference("reg.example.org/a").scheme == "https"
    assert registry.parse_reference("busybox").api_host == "registry-1.docker.io"


def test_a_bad_reference_is_refused():
    with pytest.raises(PublishError):
        registry.parse_reference("UPPER/Case")


D = ["sha256:" + c * 64 for c in "abcdef"]
MANIFEST = {"schemaVersion": 2, "mediaType": registry.MANIFEST_TYPES[3],
            "config": {"digest": D[2], "size": 5},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": D[0], "size": 10},
                       {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": D[1], "size": 20}]}
INDEX = {"schemaVersion": 2, "mediaType": registry.MANIFEST_TYPES[1], "manifests": [
    {"digest": D[4], "platform": {"os": "linux", "architecture": "arm64"}},
    {"digest": D[5], "platform": {"os": "linux", "architecture": "amd64"}}]}


@pytest.fixture
def hub():
    """/v2/library/app/manifests/{list,single,D[5]} behind a bearer token from /token."""
    seen = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code, doc, media="application/json", extra=None):
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", media)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            port = self.server.server_address[1]
            if self.path.startswith("/token?"):
                assert "scope=repository%3Alibrary%2Fapp%3Apull" in self.path
                return self._send(200, {"token": "T"})
            if self.headers.get("Authorization") != "Bearer T":
                return self._send(401, {}, extra={"WWW-Authenticate":
                                  f'Bearer realm="http://127.0.0.1:{port}/token",'
                                  'service="test"'})
            if self.path == "/v2/library/app/manifests/list":
                return self._send(200, INDEX, registry.MANIFEST_TYPES[1])
            if self.path in ("/v2/library/app/manifests/single",
                             f"/v2/library/app/manifests/{D[5]}"):
                return self._send(200, MANIFEST, registry.MANIFEST_TYPES[3])
            return self._send(404, {})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], seen
    srv.shutdown()


def _ref(port, tag):
    return registry.Reference(f"127.0.0.1:{port}", "library/app", tag)


def test_manifest_layers_after_a_token(hub):
    port, seen = hub
    layers = registry.Registry().layers(_ref(port, "single"))
    assert [la.digest for la in layers] == D[:2] and layers[1].size == 20
    assert any(p.startswith("/token?") for p in seen)


def test_a_manifest_list_is_resolved_to_the_platform(hub):
    port, seen = hub
    assert [la.digest for la in registry.Registry().layers(_ref(port, "list"))] == D[:2]
    assert f"/v2/library/app/manifests/{D[5]}" in seen  # amd64, not arm64's D[4]
    with pytest.raises(PublishError, match="no image for linux/s390x"):
        registry.Registry().layers(_ref(port, "list"), architecture="s390x")


def test_a_missing_image_says_what_the_registry_answered(hub):
    port, _ = hub
    with pytest.raises(PublishError, match="404"):
        registry.Registry().layers(_ref(port, "nope"))


def test_the_image_id_is_the_config_digest(hub):
    port, _ = hub
    config, layers = registry.Registry().image(_ref(port, "single"))
    assert config == D[2] and len(layers) == 2


def test_a_tag_that_moved_since_the_engine_pulled_it_is_refused(hub):
    """cvmfs-thin would publish the engine's files under the other image's digests."""
    from cvmfs_graphdriver.publish import cli

    port, _ = hub
    source = f"127.0.0.1:{port}/library/app:single"
    attrs = {"Id": D[3], "Os": "linux", "Architecture": "amd64"}
    with pytest.raises(PublishError, match="pull .* again"):
        cli._registry_keys(source, attrs, ["a" * 64, "b" * 64])
    attrs["Id"] = D[2]
    assert cli._registry_keys(source, attrs, ["a" * 64, "b" * 64]) == [
        D[0].split(":")[1], D[1].split(":")[1]]
