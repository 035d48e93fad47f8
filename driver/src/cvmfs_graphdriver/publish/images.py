"""Docker images in and out: reading layers of a source image, writing thin images.

Uses the Docker Python SDK (the `publisher` extra), imported lazily so the driver daemon
never needs it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Type

from .. import archive, thin
from ..errors import UnsafeLayerError
from .stores import PublishError

# What a thin image copies from its source's config (and nothing else).
COPIED_CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels")


def docker_client(host: Optional[str] = None) -> Any:
    try:
        import docker
    except ImportError:
        raise PublishError(
            "cvmfs-thin needs the Docker SDK for Python: "
            "pip install 'cvmfs-graphdriver[publisher]'"
        ) from None
    try:
        client = docker.DockerClient(base_url=host) if host else docker.from_env()
        client.ping()
    except Exception as e:
        where = host or os.environ.get("DOCKER_HOST") or "the default socket"
        raise PublishError(f"cannot reach the Docker engine at {where}: {e}") from None
    return client


def normalise_tag(tag: str) -> str:
    last = tag.rsplit("/", 1)[-1]
    return tag if ":" in last or "@" in last else f"{tag}:latest"


def engine_errors() -> Tuple[Type[BaseException], ...]:
    """What the Docker SDK (and requests, under it) raise when the engine or its registry
    fails: one image's failure, not the run's."""
    try:
        import docker.errors
        import requests.exceptions
    except ImportError:
        return ()
    return (docker.errors.DockerException, requests.exceptions.RequestException)


def get_image(client: Any, ref: str, pull: bool = True) -> Any:
    import docker.errors

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        if not pull:
            raise PublishError(f"image {ref} is not in the local engine") from None
    try:
        return client.images.pull(ref)
    except docker.errors.APIError as e:
        raise PublishError(f"image {ref} is not local and cannot be pulled: {e}") from None


def pull(client: Any, ref: str) -> Any:
    """`ref` pulled afresh from its registry (a tag that moved gives the new image)."""
    import docker.errors

    try:
        return client.images.pull(ref)
    except docker.errors.APIError as e:
        raise PublishError(f"cannot pull {ref}: {e}") from None


@dataclass
class SavedImage:
    """An image exported with `docker save`, read layer by layer."""

    tar: tarfile.TarFile
    layer_paths: List[str]  # base first
    config: Dict[str, Any]

    def layer_size(self, index: int) -> int:
        """The bytes of layer `index`'s tar."""
        return int(self.tar.getmember(self.layer_paths[index]).size)

    @contextmanager
    def open_layer(self, index: int) -> Iterator[IO[bytes]]:
        f = self.tar.extractfile(self.layer_paths[index])
        if f is None:
            raise PublishError(f"layer {self.layer_paths[index]} missing from docker save output")
        with f:
            yield f


@contextmanager
def saved(image: Any, workdir: Optional[str] = None) -> Iterator[SavedImage]:
    with tempfile.TemporaryDirectory(prefix="cvmfs-thin-", dir=workdir) as tmp:
        path = os.path.join(tmp, "image.tar")
        with open(path, "wb") as f:
            for chunk in image.save(named=False):
                f.write(chunk)
        with tarfile.open(path, "r:") as tf:
            manifest = json.load(_member(tf, "manifest.json"))
            if len(manifest) != 1:
                raise PublishError(f"docker save returned {len(manifest)} images, expected 1")
            names = set(tf.getnames())
            wanted = [manifest[0].get("Config", ""), *manifest[0].get("Layers", [])]
            if not all(wanted) or not set(wanted) <= names:
                # Docker on the containerd store writes such an archive (and exits 0) for
                # an image whose layers were never downloaded: pulled lazily.
                raise PublishError(
                    f"docker save of {image.id[:19]} holds no data for its config or layers: "
                    "the engine does not have them (an image pulled lazily through a remote "
                    "snapshotter?); convert it on a machine that pulled it in full")
            config = json.load(_member(tf, manifest[0]["Config"]))
            yield SavedImage(tf, list(manifest[0]["Layers"]), config)


def _member(tf: tarfile.TarFile, name: str) -> IO[bytes]:
    f = tf.extractfile(name)
    if f is None:
        raise PublishError(f"{name} missing from docker save output")
    return f


# The PAX record of a file capability (security.capability) in a layer tar.
CAPABILITY_RECORD = "SCHILY.xattr.security.capability"


class LayerScan(NamedTuple):
    digest: str  # sha256 of the tar
    names: List[List[str]]  # entry names, split into components
    size: int
    capabilities: List[str]  # entries that carry file capabilities


def scan_layer(stream: IO[bytes]) -> LayerScan:
    """What the publisher needs of a layer tar, in one pass."""
    hasher = hashlib.sha256()
    names: List[List[str]] = []
    capabilities: List[str] = []
    size = 0

    class Tee(io.RawIOBase):
        def readinto(self, b: Any) -> int:
            nonlocal size
            data = stream.read(len(b))
            hasher.update(data)
            size += len(data)
            b[: len(data)] = data
            return len(data)

        def readable(self) -> bool:
            return True

    reader = io.BufferedReader(Tee(), 1 << 20)
    with tarfile.open(fileobj=reader, mode="r|", errors="surrogateescape") as tf:
        for m in tf:
            try:
                names.append(archive.split_member_name(m.name))
            except UnsafeLayerError as e:
                raise PublishError(f"the image has an unsafe layer: {e}") from None
            if CAPABILITY_RECORD in m.pax_headers:
                capabilities.append("/".join(names[-1]))
    while reader.read(1 << 20):
        pass
    return LayerScan(hasher.hexdigest(), names, size, capabilities)


# What Docker and containerd put in the environment of an image that sets none; a thin
# image sets CVMFS_IMAGE, so it must carry the PATH its source would have had.
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def thin_config(source_config: Dict[str, Any]) -> Dict[str, Any]:
    src = source_config.get("config") or {}
    cfg: Dict[str, Any] = {k: src[k] for k in COPIED_CONFIG_KEYS if src.get(k) is not None}
    env = [e for e in cfg.get("Env") or [] if not e.startswith("CVMFS_IMAGE=")]
    if not env:
        env = [DEFAULT_PATH]
    cfg["Env"] = env + ["CVMFS_IMAGE=true"]
    return cfg


def descriptor_layer(descriptor: thin.Descriptor) -> bytes:
    """The thin image's only layer: a tar holding thin.json (byte for byte reproducible)."""
    data = descriptor.to_json().encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(thin.DESCRIPTOR_NAME)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def thin_image_archive(descriptor: thin.Descriptor, config: Dict[str, Any],
                       architecture: str, os_name: str, created: str, tag: str,
                       comment: str) -> Tuple[bytes, str, int]:
    """A `docker load` archive of the thin image: (archive, image id, thin layer bytes)."""
    layer = descriptor_layer(descriptor)
    diff_id = hashlib.sha256(layer).hexdigest()
    image_config = {
        "architecture": architecture or "amd64",
        "os": os_name or "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": created, "created_by": comment}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": [normalise_tag(tag)],
                 "Layers": [f"{diff_id}/layer.tar"]}]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in ((f"{diff_id}/layer.tar", layer), (f"{config_hex}.json", config_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), f"sha256:{config_hex}", len(layer)


def load(client: Any, archive_bytes: bytes) -> None:
    try:
        client.images.load(archive_bytes)
    except Exception as e:
        raise PublishError(f"docker load of the thin image failed: {e}") from None


def push(client: Any, tag: str, progress: Any) -> None:
    repo, _, name_tag = normalise_tag(tag).rpartition(":")
    for chunk in client.images.push(repo, tag=name_tag, stream=True, decode=True):
        if "error" in chunk:
            raise PublishError(f"docker push {tag} failed: {chunk['error']}")
        if chunk.get("status") and chunk.get("id") is None:
            progress(chunk["status"])


def read_descriptor(client: Any, ref: str) -> Tuple[thin.Descriptor, int]:
    """The thin.json of an image (and the index of the layer holding it)."""
    image = get_image(client, ref, pull=True)
    with saved(image) as img:
        for index in range(len(img.layer_paths)):
            with img.open_layer(index) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
                for m in tf:
                    if m.isreg() and _member_parts(m.name) == [thin.DESCRIPTOR_NAME]:
                        f = tf.extractfile(m)
                        data = f.read() if f else b""
                        return thin.parse_descriptor(data), index
    raise PublishError(f"{ref} is not a thin image: none of its layers holds thin.json")


def _member_parts(name: str) -> List[str]:
    try:
        return archive.split_member_name(name)
    except UnsafeLayerError:
        return []  # not a name this tool reads anything from
