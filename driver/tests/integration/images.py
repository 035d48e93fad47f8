"""Images with every awkward filesystem feature, for differential tests against overlay2.

`write_context` writes a Docker build context whose layers create, delete and replace
files and directory trees, leave an opaque directory, and carry hard links, symlinks
(relative, absolute, dangling), setuid/setgid/sticky modes, non-root owners, a FIFO, a
character device, a file capability (`security.capability`), long and deep names and
non-ASCII names. `EXPECTED` lists what a container made from it must show, so a test
can tell a faithful copy from a build that silently lost something.

The helpers here run the docker CLI against the harness's private daemons only.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import tarfile
from typing import Dict, List, Optional, Set, Tuple

from harness import Dockerd, DockerError, export_manifest

BASE_TAG = "cgd-diff-base:1"

LONG_DIR = "D" * 200  # one 200-byte component ...
LONG_FILE = "F" * 255  # ... and one of NAME_MAX
DEEP_DIR = "/".join(f"level{i:02d}-" + "d" * 10 for i in range(12))  # 215 bytes deep
NAIVE = "naïve-日本.txt"
UNI_DIR = "ünïcödé"
UNI_FILE = "файл"

# struct vfs_cap_data, revision 2, effective bit set: cap_net_raw (13) in "permitted".
CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 13, 0, 0, 0)
CAP_PAX_VALUE = CAP_NET_RAW_EP.decode("utf-8", "surrogateescape")

# Every step changes /data only; later steps delete, replace and recreate what earlier
# steps made. Step 3 (rm -rf + mkdir of opq in one step) leaves an opaque directory.
DOCKERFILE = f"""\
FROM {BASE_TAG}
RUN set -e; mkdir /data; cd /data; \\
    mkdir -p keep tree/a/b/c gone-tree/x/y opq/old recreated/old d2f/child empty \\
             modes owned links; \\
    echo keep > keep/file; echo leaf > tree/a/b/c/leaf; echo top > tree/a/top; \\
    echo z > gone-tree/x/y/z; echo gone > gone-file; \\
    echo old > opq/old/file; echo old2 > opq/file; echo old > recreated/old/file; \\
    echo was-a-file > f2d; echo child > d2f/child/f; \\
    echo hl > links/h1; ln links/h1 links/h2; ln links/h1 links/h3; \\
    ln -s ../keep/file links/rel; ln -s /data/keep/file links/abs; \\
    ln -s /nonexistent/target links/dangling; ln -s ../tree links/dirlink; \\
    echo s > modes/suid; chmod 4755 modes/suid; \\
    echo g > modes/sgid; chmod 2755 modes/sgid; \\
    echo b > modes/both; chmod 6711 modes/both; \\
    echo n > modes/none; chmod 0 modes/none; \\
    mkdir modes/sticky modes/sgid-dir; chmod 1777 modes/sticky; chmod 2775 modes/sgid-dir; \\
    echo o > owned/file; mkdir owned/dir; echo p > owned/dir/f; chown -R 1234:5678 owned; \\
    echo u > owned/uid-only; chown 1234 owned/uid-only; \\
    echo g > owned/gid-only; chown :5678 owned/gid-only; \\
    echo x > owned/suid-owned; chown 1234:5678 owned/suid-owned; chmod 4750 owned/suid-owned; \\
    mkfifo fifo; mknod chardev c 1 3; mknod blockdev b 7 200
ADD cap.tar /
RUN set -e; cd /data; \\
    rm gone-file; rm -rf gone-tree; \\
    rm -rf opq; mkdir opq; echo new > opq/new; \\
    rm -rf recreated; \\
    rm f2d; mkdir f2d; echo inside > f2d/inside; \\
    rm -rf d2f; echo now-a-file > d2f; \\
    ln keep/file keep/file-hl; \\
    mkdir -p long/{LONG_DIR}; echo long > long/{LONG_DIR}/{LONG_FILE}; \\
    mkdir -p deep/{DEEP_DIR}; echo deep > deep/{DEEP_DIR}/file; \\
    echo utf > '{NAIVE}'; mkdir '{UNI_DIR}'; echo ф > '{UNI_DIR}/{UNI_FILE}'; \\
    mkdir empty2
RUN set -e; cd /data; \\
    mkdir recreated; echo different > recreated/new; chmod 0750 recreated; \\
    chmod 0640 tree/a/top; chown 1234:5678 keep
"""

# What a container of the image shows: path -> (tar type, permission bits, uid, gid,
# link target or None). Checked against `docker export` output.
REG, HARD, SYM, CHR, BLK, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"
EXPECTED: Dict[str, Tuple[str, int, int, int, Optional[str]]] = {
    "data/keep": (DIR, 0o755, 1234, 5678, None),
    "data/keep/file": (REG, 0o644, 0, 0, None),
    "data/keep/file-hl": (HARD, 0o644, 0, 0, "data/keep/file"),
    "data/tree/a/b/c/leaf": (REG, 0o644, 0, 0, None),
    "data/tree/a/top": (REG, 0o640, 0, 0, None),
    "data/opq": (DIR, 0o755, 0, 0, None),
    "data/opq/new": (REG, 0o644, 0, 0, None),
    "data/recreated": (DIR, 0o750, 0, 0, None),
    "data/recreated/new": (REG, 0o644, 0, 0, None),
    "data/f2d": (DIR, 0o755, 0, 0, None),
    "data/f2d/inside": (REG, 0o644, 0, 0, None),
    "data/d2f": (REG, 0o644, 0, 0, None),
    "data/empty": (DIR, 0o755, 0, 0, None),
    "data/empty2": (DIR, 0o755, 0, 0, None),
    "data/links/h1": (REG, 0o644, 0, 0, None),
    "data/links/h2": (HARD, 0o644, 0, 0, "data/links/h1"),
    "data/links/h3": (HARD, 0o644, 0, 0, "data/links/h1"),
    "data/links/rel": (SYM, 0o777, 0, 0, "../keep/file"),
    "data/links/abs": (SYM, 0o777, 0, 0, "/data/keep/file"),
    "data/links/dangling": (SYM, 0o777, 0, 0, "/nonexistent/target"),
    "data/links/dirlink": (SYM, 0o777, 0, 0, "../tree"),
    "data/modes/suid": (REG, 0o4755, 0, 0, None),
    "data/modes/sgid": (REG, 0o2755, 0, 0, None),
    "data/modes/both": (REG, 0o6711, 0, 0, None),
    "data/modes/none": (REG, 0o000, 0, 0, None),
    "data/modes/sticky": (DIR, 0o1777, 0, 0, None),
    "data/modes/sgid-dir": (DIR, 0o2775, 0, 0, None),
    "data/owned": (DIR, 0o755, 1234, 5678, None),
    "data/owned/file": (REG, 0o644, 1234, 5678, None),
    "data/owned/dir": (DIR, 0o755, 1234, 5678, None),
    "data/owned/dir/f": (REG, 0o644, 1234, 5678, None),
    "data/owned/uid-only": (REG, 0o644, 1234, 0, None),
    "data/owned/gid-only": (REG, 0o644, 0, 5678, None),
    "data/owned/suid-owned": (REG, 0o4750, 1234, 5678, None),
    "data/fifo": (FIFO, 0o644, 0, 0, None),
    "data/chardev": (CHR, 0o644, 0, 0, None),
    "data/blockdev": (BLK, 0o644, 0, 0, None),
    "data/cap/netraw": (REG, 0o755, 0, 0, None),
    "data/cap/netraw-owned": (REG, 0o750, 1234, 5678, None),
    f"data/long/{LONG_DIR}/{LONG_FILE}": (REG, 0o644, 0, 0, None),
    f"data/deep/{DEEP_DIR}/file": (REG, 0o644, 0, 0, None),
    f"data/{NAIVE}": (REG, 0o644, 0, 0, None),
    f"data/{UNI_DIR}/{UNI_FILE}": (REG, 0o644, 0, 0, None),
}
CAP_FILES = ("data/cap/netraw", "data/cap/netraw-owned")
# Made by an early step and deleted by a later one: never visible in a container.
DELETED = (
    "data/gone-file", "data/gone-tree", "data/gone-tree/x/y/z", "data/opq/old",
    "data/opq/old/file", "data/opq/file", "data/recreated/old", "data/recreated/old/file",
    "data/d2f/child", "data/d2f/child/f",
)

# The same changes run in a container under each daemon; `docker diff` must agree.
CONTAINER_SCRIPT = f"""\
set -e; cd /data
echo added > new-file
mkdir -p new-dir/sub; echo n > new-dir/sub/f; mkdir new-empty
echo more >> keep/file
chmod 600 tree/a/b/c/leaf
chown 42:43 owned/file
chmod 4711 modes/sgid
touch -d '2001-02-03 04:05:06' modes/suid
rm links/h2
rm -rf tree/a/b
rm -rf opq; mkdir opq; echo again > opq/again
ln new-file new-hl
ln -s ../new-file links/new-sym
ln -s /gone/away links/new-dangling
ln links/h1 links/h4
rm d2f; mkdir d2f; echo x > d2f/x
rm -rf f2d; echo file > f2d
mkfifo new-fifo
rm '{NAIVE}'
echo changed > '{UNI_DIR}/{UNI_FILE}'
echo neu > '{UNI_DIR}/neü-{LONG_FILE[:200]}'
rm -rf long
mv deep deep-moved
rm fifo
chown 7:8 empty
touch blockdev
"""


def cap_tar() -> bytes:
    """A tar whose files carry a file capability, for ADD (busybox has no setcap)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("data/cap")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
        tf.addfile(d)
        for name, mode, owner in (("netraw", 0o755, (0, 0)),
                                  ("netraw-owned", 0o750, (1234, 5678))):
            body = f"pretend binary {name}\n".encode()
            f = tarfile.TarInfo(f"data/cap/{name}")
            f.mode, f.size, f.mtime = mode, len(body), 1_600_000_000
            f.uid, f.gid = owner
            f.pax_headers = {"SCHILY.xattr.security.capability": CAP_PAX_VALUE}
            tf.addfile(f, io.BytesIO(body))
    return buf.getvalue()


def write_context(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "Dockerfile"), "w", encoding="utf-8") as f:
        f.write(DOCKERFILE)
    with open(os.path.join(directory, "cap.tar"), "wb") as f:
        f.write(cap_tar())
    return directory


# ---------------------------------------------------------------------------- docker


def build(d: Dockerd, context: str, tag: str) -> str:
    """`docker build` with the classic builder (what 20.10 offers graph-driver plugins)."""
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    r = subprocess.run(["docker", "-H", d.host, "build", "--network", "none", "-q", "-t", tag,
                        context], env=env, capture_output=True, timeout=300)
    if r.returncode != 0:
        raise DockerError(f"docker build on {d.storage_driver} failed:\n"
                          f"{r.stderr.decode(errors='replace')}{r.stdout.decode()[-3000:]}")
    return image_id(d, tag)


def image_id(d: Dockerd, ref: str) -> str:
    return d.out("image", "inspect", "--format", "{{.Id}}", ref).strip()


def transfer(src: Dockerd, dst: Dockerd, ref: str) -> None:
    """`docker save` from one daemon, `docker load` into another."""
    dst.docker("load", "-q", input=src.docker("save", ref).stdout)


def export_of(d: Dockerd, image: str) -> Dict[str, tuple]:
    """Export manifest of a fresh (never started) container of `image`."""
    cid = d.out("create", "--network", "none", image).strip()
    try:
        return export_container(d, cid)
    finally:
        d.docker("rm", "-f", cid, check=False)


def export_container(d: Dockerd, container: str) -> Dict[str, tuple]:
    return export_manifest(d.docker("export", container).stdout)


def saved_layers(d: Dockerd, ref: str) -> List[bytes]:
    """The layer tars of `docker save`, bottom first."""
    data = d.docker("save", ref).stdout
    files: Dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for m in tf:
            if m.isreg() and (m.name == "manifest.json" or m.name.endswith("layer.tar")):
                f = tf.extractfile(m)
                files[m.name] = f.read() if f else b""
    manifest = json.loads(files["manifest.json"])
    assert len(manifest) == 1, manifest
    return [files[name] for name in manifest[0]["Layers"]]


Entry = Tuple[str, str, int, int, int, int, str, Tuple[Tuple[str, str], ...]]


def layer_entries(data: bytes) -> Set[Entry]:
    """A layer tar's entries: name, type, permission bits, owner, size, link, xattrs."""
    out: Set[Entry] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for m in tf:
            kind = m.type.decode() if isinstance(m.type, bytes) else str(m.type)
            xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            out.add((m.name.rstrip("/"), kind, stat.S_IMODE(m.mode), m.uid, m.gid,
                     m.size if m.isreg() else 0,
                     m.linkname if (m.issym() or m.islnk()) else "", xattrs))
    return out


def layer_names(data: bytes) -> List[str]:
    """A layer tar's entry names in stream order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        return [m.name.rstrip("/") for m in tf]
