"""The registry's view of an image: its manifest's layer digests (standard library only).

containerd asks a snapshotter for a layer by the digest the registry's manifest gives it
(the compressed blob's digest, `containerd.io/snapshot/cri.layer-digest`), while the
engine only knows uncompressed diff IDs. To publish layers where lazy pulls look for
them, cvmfs-thin reads the manifest from the registry itself: the Docker Registry HTTP
API v2 (`GET /v2/<name>/manifests/<reference>`), with an anonymous bearer token when the
registry asks for one, and a manifest list / OCI index resolved to one platform.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .stores import PublishError

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
MAX_MANIFEST_BYTES = 4 << 20
TAGS_PAGE = 1000
MAX_TAG_PAGES = 100
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written ("docker.io" for Docker Hub)
    repository: str  # "library/busybox"
    reference: str  # tag or digest

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def scheme(self) -> str:
        # As Docker: registries on the loopback are spoken to over plain HTTP.
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else \
            self.registry.split("]")[0] + "]"
        return "http" if host in ("localhost", "[::1]") or host.startswith("127.") else "https"


def parse_reference(ref: str) -> Reference:
    """Docker's normalisation: `busybox` is docker.io/library/busybox:latest."""
    name, digest = (ref.split("@", 1) + [""])[:2]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DEFAULT_REGISTRY, name
    tag = ""
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if not path or not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", path):
        raise PublishError(f"{ref!r} is not an image reference")
    return Reference(registry, path, digest or tag or "latest")


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256:<hex> of the blob as the registry stores it
    media_type: str
    size: int


class Registry:
    """Reads manifests from one registry, remembering a bearer token once it has one."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._tokens: Dict[Tuple[str, str], str] = {}

    def _get(self, ref: Reference, path: str, accept: str) -> Tuple[bytes, str]:
        body, headers = self._get_full(ref, path, accept)
        return body, headers.get("Content-Type", "")

    def _get_full(self, ref: Reference, path: str, accept: str) -> Tuple[bytes, Any]:
        url = f"{ref.scheme}://{ref.api_host}/v2/{ref.repository}/{path}"
        for attempt in range(2):
            headers = {"Accept": accept}
            token = self._tokens.get((ref.api_host, ref.repository))
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                            timeout=self.timeout) as r:
                    body = r.read(MAX_MANIFEST_BYTES + 1)
                    if len(body) > MAX_MANIFEST_BYTES:
                        raise PublishError(f"{url}: manifest larger than {MAX_MANIFEST_BYTES}")
                    return body, r.headers
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0:
                    self._authorize(ref, e.headers.get("WWW-Authenticate", ""), url)
                    continue
                raise PublishError(f"registry answered {e.code} {e.reason} for {url}") from None
            except (urllib.error.URLError, OSError) as e:
                raise PublishError(f"cannot reach the registry at {url}: {e}") from None
        raise PublishError(f"registry refused {url} even with a token (credentials needed?)")

    def _authorize(self, ref: Reference, challenge: str, url: str) -> None:
        """Anonymous token for a `Bearer realm=...,service=...` challenge."""
        if not challenge.lower().startswith("bearer "):
            raise PublishError(f"{url} needs credentials ({challenge or 'no challenge'}); "
                               "cvmfs-thin reads public images only")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise PublishError(f"{url}: unusable token realm in {challenge!r}")
        params.setdefault("scope", f"repository:{ref.repository}:pull")
        try:
            with urllib.request.urlopen(f"{realm}?{urllib.parse.urlencode(params)}",
                                        timeout=self.timeout) as r:
                doc = json.loads(r.read(1 << 20))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PublishError(f"cannot get a token from {realm}: {e}") from None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str):
            raise PublishError(f"{realm} gave no token")
        self._tokens[(ref.api_host, ref.repository)] = token

    def tags(self, ref: Reference) -> List[str]:
        """Every tag of `ref`'s repository (`GET /v2/<name>/tags/list`, following the
        registry's `Link: <...>; rel="next"` pages), sorted."""
        out: List[str] = []
        path = f"tags/list?n={TAGS_PAGE}"
        for _ in range(MAX_TAG_PAGES):
            body, headers = self._get_full(ref, path, "application/json")
            try:
                doc = json.loads(body)
            except ValueError:
                raise PublishError(f"the registry's tag list of {ref.registry}/"
                                   f"{ref.repository} is not JSON") from None
            tags = doc.get("tags") if isinstance(doc, dict) else None
            if tags is None:
                tags = []  # distribution answers null for a repository without tags
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise PublishError(f"the registry's tag list of {ref.registry}/"
                                   f"{ref.repository} is not a list of names")
            out.extend(tags)
            m = re.search(r'<([^>]*)>\s*;\s*rel="?next"?', headers.get("Link", "") or "")
            if not m:
                return sorted(set(out))
            nxt = urllib.parse.urlsplit(m.group(1))
            prefix = f"/v2/{ref.repository}/"
            if not nxt.path.startswith(prefix) or nxt.netloc not in ("", ref.api_host):
                raise PublishError(f"the registry's next page of tags ({m.group(1)}) is "
                                   f"not on {ref.api_host}/v2/{ref.repository}")
            path = nxt.path[len(prefix):] + (f"?{nxt.query}" if nxt.query else "")
        raise PublishError(f"{ref.registry}/{ref.repository} lists more than "
                           f"{TAGS_PAGE * MAX_TAG_PAGES} tags: name the tags instead of a glob")

    def layers(self, ref: Reference, os_name: str = "linux",
               architecture: str = "amd64") -> List[Layer]:
        """The layers of `ref` (for that platform when it is a list), base first."""
        return self.image(ref, os_name, architecture)[1]

    def image(self, ref: Reference, os_name: str = "linux",
              architecture: str = "amd64") -> Tuple[str, List[Layer]]:
        """The config digest (the image ID) and the layers of `ref`, base first."""
        doc, media = self._manifest(ref, ref.reference, ", ".join(MANIFEST_TYPES))
        if media in INDEX_TYPES or "manifests" in doc:
            chosen = _pick(doc.get("manifests") or [], os_name, architecture)
            if chosen is None:
                raise PublishError(f"{ref.registry}/{ref.repository}:{ref.reference} has no "
                                   f"image for {os_name}/{architecture}")
            doc, media = self._manifest(ref, chosen, ", ".join(MANIFEST_TYPES[2:]))
        out = []
        for n, entry in enumerate(doc.get("layers") or []):
            digest = entry.get("digest") if isinstance(entry, dict) else None
            if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
                raise PublishError(f"manifest layer {n + 1} has digest {digest!r} "
                                   "(cvmfs-thin handles sha256 only)")
            out.append(Layer(digest, str(entry.get("mediaType", "")),
                             int(entry.get("size", 0))))
        if not out:
            raise PublishError(f"the manifest of {ref.repository}:{ref.reference} lists no layers")
        config = (doc.get("config") or {}).get("digest") if isinstance(doc.get("config"),
                                                                       dict) else None
        if not isinstance(config, str) or not _DIGEST_RE.match(config):
            raise PublishError(f"the manifest of {ref.repository}:{ref.reference} has no "
                               "sha256 config digest")
        return config, out

    def _manifest(self, ref: Reference, reference: str,
                  accept: str) -> Tuple[Dict[str, Any], str]:
        body, media = self._get(ref, f"manifests/{reference}", accept)
        try:
            doc = json.loads(body)
        except ValueError:
            raise PublishError(f"the registry's manifest of {ref.repository} is not JSON") from None
        if not isinstance(doc, dict):
            raise PublishError(f"the registry's manifest of {ref.repository} is not an object")
        return doc, media.split(";")[0].strip() or str(doc.get("mediaType", ""))


def _pick(manifests: List[Any], os_name: str, architecture: str) -> Optional[str]:
    for m in manifests:
        p = (m.get("platform") or {}) if isinstance(m, dict) else {}
        if p.get("os") == os_name and p.get("architecture") == architecture:
            digest = m.get("digest")
            return digest if isinstance(digest, str) and _DIGEST_RE.match(digest) else None
    return None
