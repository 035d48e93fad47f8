"""A private containerd (Debian 12's 1.6) that loads the snapshotter as a proxy plugin, `ctr`
against it, and tiny OCI images made here (no registry, no dockerd).

Each containerd has its own root, state, gRPC/ttrpc sockets and config; teardown kills the
tasks it ran, stops it, kills the shims that name its own socket, and unmounts what is left
under its directories. Nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from sntools import answers, wait_for

NAMESPACE = "cgd-test"


@dataclass
class Containerd:
    root: str  # everything of this containerd lives below
    proxy_socket: str  # the snapshotter's socket ([proxy_plugins.cvmfs])
    proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return os.path.join(self.root, "c.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "containerd.log")

    def config(self) -> str:
        path = os.path.join(self.root, "config.toml")
        r = self.root
        with open(path, "w") as f:
            f.write(f"""\
version = 2
root = "{r}/root"
state = "{r}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/opt"

[proxy_plugins.cvmfs]
  type = "snapshot"
  address = "{self.proxy_socket}"
""")
        return path

    def start(self) -> Containerd:
        os.makedirs(self.root, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(["containerd", "--config", self.config()], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or (
            answers(self.address) and self.ctr("version", check=False).returncode == 0),
            60, "containerd")
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited with {proc.returncode}:\n{self.log()}")
        return self

    def ctr(self, *args: str, check: bool = True, timeout: float = 180,
            input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
                           capture_output=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stderr.decode(errors='replace')}"
                               f"{r.stdout.decode(errors='replace')[-2000:]}")
        return r

    def out(self, *args: str, **kw) -> str:
        return self.ctr(*args, **kw).stdout.decode()

    def gc(self) -> None:
        """Run containerd's garbage collector now: it removes the snapshots containerd no
        longer references from the snapshotter (deleting a lease with --sync runs it)."""
        lease = self.out("leases", "create").split()[0]
        self.ctr("leases", "delete", "--sync", lease)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def _shims(self) -> List[int]:
        """Shim processes started by this containerd (they name its socket)."""
        pids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and \
                    self.address.encode() in argv:
                pids.append(int(pid))
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for line in self.out("tasks", "ls", "-q", timeout=30).split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False, timeout=30)
                    time.sleep(0.2)
                    self.ctr("tasks", "delete", "-f", line, check=False, timeout=30)
                for line in self.out("containers", "ls", "-q", timeout=30).split():
                    self.ctr("containers", "delete", line, check=False, timeout=30)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self._shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_below(self.root)


def unmount_below(path: str) -> None:
    from cvmfs_graphdriver import mounts

    for point in mounts.mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)


# ---------------------------------------------------------------------------- images


def _tar_entry(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE,
               data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, 1_600_000_000
    if kind == tarfile.DIRTYPE:
        info.mode = mode if mode != 0o644 else 0o755
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


Entry = Tuple  # (name, kind, data, mode, uid, gid) with defaults


def layer_tar(entries: Sequence[Entry]) -> bytes:
    """An uncompressed layer tar from (name, "dir"|"file"|"whiteout"|"opaque", data?, mode?,
    uid?, gid?) entries; whiteouts use the OCI `.wh.` names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in entries:
            name, kind, *rest = entry
            data = rest[0] if rest else b""
            mode = rest[1] if len(rest) > 1 else (0o755 if kind == "dir" else 0o644)
            uid = rest[2] if len(rest) > 2 else 0
            gid = rest[3] if len(rest) > 3 else 0
            if kind == "dir":
                _tar_entry(tf, name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)
            elif kind == "file":
                _tar_entry(tf, name, tarfile.REGTYPE, data, mode, uid, gid)
            elif kind == "whiteout":
                head, base = os.path.split(name)
                _tar_entry(tf, os.path.join(head, ".wh." + base))
            elif kind == "opaque":
                _tar_entry(tf, os.path.join(name, ".wh..wh..opq"))
            else:
                raise ValueError(kind)
    return buf.getvalue()


@dataclass
class OciImage:
    name: str
    layers: List[bytes]
    cmd: List[str] = field(default_factory=lambda: ["/bin/sh"])

    def archive(self) -> bytes:
        """An OCI image layout tar that `ctr images import` reads."""
        blobs: Dict[str, bytes] = {}

        def blob(data: bytes) -> Dict[str, object]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            blobs[digest] = data
            return {"digest": digest, "size": len(data)}

        layer_descs = [dict(mediaType="application/vnd.oci.image.layer.v1.tar", **blob(t))
                       for t in self.layers]
        config = {
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": self.cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers",
                       "diff_ids": [d["digest"] for d in layer_descs]},
        }
        config_desc = dict(mediaType="application/vnd.oci.image.config.v1+json",
                           **blob(json.dumps(config, sort_keys=True).encode()))
        manifest = {"schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": layer_descs}
        manifest_desc = dict(mediaType="application/vnd.oci.image.manifest.v1+json",
                             **blob(json.dumps(manifest, sort_keys=True).encode()))
        manifest_desc["annotations"] = {"io.containerd.image.name": self.name,
                                        "org.opencontainers.image.ref.name":
                                            self.name.rsplit(":", 1)[1]}
        manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
        index = {"schemaVersion": 2, "manifests": [manifest_desc]}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                     "index.json": json.dumps(index).encode()}
            for digest, data in blobs.items():
                files["blobs/sha256/" + digest.split(":", 1)[1]] = data
            for d in ("blobs", "blobs/sha256"):
                _tar_entry(tf, d, tarfile.DIRTYPE)
            for name, data in files.items():
                _tar_entry(tf, name, tarfile.REGTYPE, data)
        return buf.getvalue()


def busybox_layer(workdir: str) -> bytes:
    from harness import busybox_rootfs, tar_of  # the driver tests' tiny image tools

    root = os.path.join(workdir, "busybox-rootfs")
    shutil.rmtree(root, ignore_errors=True)
    return tar_of(busybox_rootfs(root))
