"""Helpers for the Docker workflow tests: what a user (or an operator) looks at.

The Engine API over the daemon's unix socket, the driver home on disk, the kernel's mount
table, image builds with the classic builder, and throw-away base images whose layers
are shared with nothing else (so removing them must free every byte).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Set

from harness import Dockerd, DockerError, busybox_rootfs, staging_left, tar_of

# ----------------------------------------------------------------------------- Engine API


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def api_get(d: Dockerd, path: str, timeout: float = 120) -> Any:
    """GET an Engine API path (e.g. "/system/df") and decode the JSON answer."""
    sock_path = d.host[len("unix://"):]
    conn = _UnixHTTPConnection(sock_path, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise DockerError(f"GET {path}: HTTP {resp.status}: {body[:500]!r}")
    return json.loads(body)


def inspect(d: Dockerd, *names: str) -> List[Dict[str, Any]]:
    return json.loads(d.out("inspect", *names))


def container_ids(d: Dockerd) -> Set[str]:
    return set(d.out("ps", "-aq", "--no-trunc").split())


def image_ids(d: Dockerd) -> Set[str]:
    return set(d.out("images", "-aq", "--no-trunc").split())


def image_tags(d: Dockerd) -> Set[str]:
    out = d.out("images", "--format", "{{.Repository}}:{{.Tag}}")
    return {t for t in out.split() if "<none>" not in t}


def image_exists(d: Dockerd, ref: str) -> bool:
    return d.docker("image", "inspect", ref, check=False).returncode == 0


# ----------------------------------------------------------------------------- driver home


def driver_home(d: Dockerd) -> str:
    """`<data-root>/<plugin>`: the Home dockerd passes to the driver's Init."""
    return os.path.join(d.data_root, d.storage_driver)


def _is_layer_name(name: str) -> bool:
    return name not in ("l", ".staging") and not name.startswith(".")


def layer_dirs(home: str) -> Set[str]:
    return {n for n in os.listdir(home)
            if _is_layer_name(n) and os.path.isdir(os.path.join(home, n))}


@dataclass(frozen=True)
class HomeUsage:
    layers: int  # layer directories
    links: int  # entries of l/
    bytes: int  # apparent size of everything stored (mounted views not counted)
    staging: int  # entries left in .staging

    def __str__(self) -> str:
        return (f"{self.layers} layers, {self.links} links, {self.bytes} bytes, "
                f"{self.staging} staging entries")


def home_usage(home: str) -> HomeUsage:
    """What the driver stores, once removed containers' files are freed (which the
    driver does just after their Remove): never descends into mounted union views."""
    staging = staging_left(home)
    total = 0
    home_dev = os.lstat(home).st_dev
    for top, dirs, files in os.walk(home):
        keep = []
        for name in dirs:
            st = os.lstat(os.path.join(top, name))
            if st.st_dev == home_dev:  # skip mount points (containers' merged views)
                keep.append(name)
        dirs[:] = keep
        for name in files:
            total += os.lstat(os.path.join(top, name)).st_size
    return HomeUsage(
        layers=len(layer_dirs(home)),
        links=len(os.listdir(os.path.join(home, "l"))),
        bytes=total,
        staging=len(staging),
    )


def mount_points() -> List[str]:
    """Mount points in this (the host's) mount namespace, as the kernel lists them."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split(" ")[4]
            out.append(point.replace("\\040", " ").replace("\\011", "\t")
                       .replace("\\012", "\n").replace("\\134", "\\"))
    return out


def mounts_below(prefix: str) -> List[str]:
    prefix = prefix.rstrip("/") + "/"
    return [p for p in mount_points() if p.startswith(prefix)]


# ----------------------------------------------------------------------------- images


def build(d: Dockerd, context: str, tag: str, dockerfile: str,
          files: Dict[str, bytes] | None = None, timeout: float = 300) -> str:
    """`docker build` with the classic builder (no buildx here), no network. Returns its log."""
    os.makedirs(context, exist_ok=True)
    with open(os.path.join(context, "Dockerfile"), "w") as f:
        f.write(dockerfile)
    for name, data in (files or {}).items():
        path = os.path.join(context, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    r = subprocess.run(["docker", "-H", d.host, "build", "--network", "none", "--force-rm",
                        "-t", tag, context], capture_output=True, env=env, timeout=timeout)
    log = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    if r.returncode != 0:
        raise DockerError(f"docker build -t {tag} failed ({r.returncode}):\n{log[-3000:]}")
    return log


def unique_base(d: Dockerd, workdir: str, tag: str) -> str:
    """A busybox image whose only layer is shared with no other image in the daemon."""
    root = os.path.join(workdir, f"rootfs-{uuid.uuid4().hex[:8]}")
    busybox_rootfs(root)
    with open(os.path.join(root, "etc", "image-id"), "w") as f:
        f.write(f"{tag} {uuid.uuid4()}\n")
    try:
        d.docker("import", "-c", 'CMD ["/bin/sh"]', "-", tag, input=tar_of(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


def tar_files(data: bytes) -> Dict[str, bytes]:
    """Regular files of a tar (name without "./" -> content); other entries map to b""."""
    out: Dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for m in tf:
            name = m.name[2:] if m.name.startswith("./") else m.name
            name = name.rstrip("/")
            f = tf.extractfile(m) if m.isreg() else None
            out[name] = f.read() if f else b""
    return out


def remove_new(d: Dockerd, containers_before: Set[str], tags_before: Set[str],
               images_before: Set[str]) -> None:
    """Remove containers, tags and images a test added (best effort: the test reports)."""
    new_containers = container_ids(d) - containers_before
    if new_containers:
        d.docker("rm", "-f", "-v", *sorted(new_containers), check=False)
    new_tags = image_tags(d) - tags_before
    if new_tags:
        d.docker("rmi", "-f", *sorted(new_tags), check=False)
    new_images = image_ids(d) - images_before
    if new_images:
        d.docker("rmi", "-f", *sorted(new_images), check=False)
