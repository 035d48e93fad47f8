#!/usr/bin/env python3
"""Lazy starts over a shaped network (issue 9 point 5): thin images (graph driver), lazily
pulled regular images (snapshotter) and full pulls, with the worker's link to the stratum 0
and to the registry shaped to 100 Mbit/s and 1 Gbit/s with ~10 ms RTT.

    sudo .venv/bin/python bench/shaped_starts.py            # the full run (3 rounds, both rates)
    sudo .venv/bin/python bench/shaped_starts.py --quick    # 1 round, 100 Mbit/s only

Writes bench/results/shaped.json, bench/results/shaped.md and PNG plots (matplotlib:
`.venv/bin/pip install matplotlib`; without it the plots are skipped and it says so).

The set-up, made and removed by this script (also on failure or SIGTERM):
- servers in a network namespace (cgd-bench-srv) joined to the root namespace (the worker)
  by a veth pair: apache2 serving the stratum 0's files (/srv/cvmfs) and docker-registry,
  each behind bench/delay_relay.py;
- the link: tbf at the rate on both veth ends; the round-trip time by the relay (5 ms each
  way), because this kernel has no netem (sch_netem is not built in, no modules). Checked
  first: 100 MB over the link, and one request's round trip;
- the worker: a real CVMFS client mount of bench.repo reading the stratum 0 through the
  link (scripts/cvmfs.sh mount, with CVMFS_STRATUM0_URL), with a new empty cache for every
  cold start; private dockerds (overlay2, and our graph driver) and containerds (overlayfs,
  and our snapshotter), a fresh one for every cold start (a node that never saw the image).
  Publishing (cvmfs_server, cvmfs-thin) uses the stratum 0 on 127.0.0.1 as usual.

Images (built once, cached in .cache/bench/): numpy = Debian 12 minbase (debootstrap) +
python3 + python3-numpy + a small layer, running `python3 -c 'import numpy; print(...)'`;
tiny = busybox, running `true`. Each is pushed to the registry and published into
bench.repo twice with cvmfs-thin: as a thin image (`--store cvmfs:bench.repo --push`) and
keyed by registry digests for lazy pulls (`--digests registry`).

Variants, each a cold start (pull + run to the first line of output; for `true`, to its
exit) on a fresh node, then a warm start (image present, CVMFS cache hot):
  thin       dockerd + cvmfs graph driver: pull the thin image, run
  lazy       containerd + cvmfs snapshotter: lazypull (remote-snapshotter labels), ctr run
  full       dockerd on overlay2: docker pull, docker run
  full-ctrd  containerd on overlayfs: the same lazypull client, ctr run (lazy's baseline)
Bytes: over the link (the worker veth's receive counter: everything, headers included),
served by the stratum 0 (apache's log) and by the registry (its log); the CVMFS cache's
size after the start (uncompressed data the client fetched). Then 10 cold starts at once:
pull, then 10 containers started together, to the last first line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "driver", "tests"))
sys.path.insert(0, os.path.join(TOP, "driver", "tests", "snapshotter"))

from benchhost import host_facts  # noqa: E402 (this directory: the script's own)
from containerd_harness import NAMESPACE, Containerd  # noqa: E402
from harness import Dockerd, DriverProcess, busybox_rootfs, tar_of, wait_until  # noqa: E402
from sntools import Daemon  # noqa: E402

NS = "cgd-bench-srv"
VETH_HOST, VETH_SRV = "cgdb-h", "cgdb-s"
HOST_IP, SRV_IP = "10.231.77.1", "10.231.77.2"
REGISTRY = f"{SRV_IP}:5000"
REPO = "bench.repo"
DELAY_MS = 5.0  # each way: RTT 10 ms
WORK = "/var/tmp/cgd-shaped"  # the client runs as user cvmfs: not below a 0700 directory
MNT_BASE = os.path.join(WORK, "cvmfs")
MNT = os.path.join(MNT_BASE, REPO)
CACHE = os.path.join(WORK, "cvmfs-cache")
IMAGE_CACHE = os.path.join(TOP, ".cache", "bench")
RESULTS = os.path.join(HERE, "results")
CVMFS_SH = os.path.join(TOP, "scripts", "cvmfs.sh")
CVMFS_THIN = os.path.join(TOP, ".venv", "bin", "cvmfs-thin")
PLUGIN = f"cgdshaped{os.getpid()}"
RATES = {"100mbit": 100e6, "1gbit": 1e9}
VARIANTS = ["thin", "lazy", "full", "full-ctrd"]
CONCURRENT_VARIANTS = ["thin", "lazy", "full"]

NUMPY_DOCKERFILE = """\
# base: debootstrap --variant=minbase bookworm, without apt's lists and downloaded .debs
FROM cgd-bench/minbase:1
RUN apt-get update && apt-get install -y --no-install-recommends python3 \\
 && rm -rf /var/lib/apt/lists/*
RUN apt-get update && apt-get install -y python3-numpy && rm -rf /var/lib/apt/lists/*
RUN printf '%s\\n' 'import numpy' 'print("numpy", numpy.__version__)' > /app.py
CMD ["python3", "/app.py"]
"""
IMAGES = {
    "numpy": {"cmd": ["python3", "-c", "import numpy; print(numpy.__version__)"],
              "what": "Debian 12 + python3-numpy, `python3 -c 'import numpy'`"},
    "tiny": {"cmd": ["true"], "what": "busybox, `true`"},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 900, input: Optional[bytes] = None,
       env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input,
                       env=None if env is None else {**os.environ, **env})
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n"
                           f"{r.stderr.decode(errors='replace')[-3000:]}"
                           f"{r.stdout.decode(errors='replace')[-2000:]}")
    return r


def nsx(*argv: str) -> List[str]:
    """argv in the server's network namespace only. Not `ip netns exec`: that also makes
    a new mount namespace holding a copy of every mount of the moment (mounts are private
    here, no systemd), and a copy of a stratum 0's FUSE mount keeps its cvmfs2 alive after
    cvmfs_server unmounts it: the next mount of that repository waits on its lock."""
    return ["nsenter", f"--net=/run/netns/{NS}", *argv]


# ---------------------------------------------------------------------------- the link


class Link:
    """The server namespace, the veth pair, the servers behind the delay relay, tbf."""

    def __init__(self) -> None:
        self.procs: Dict[str, subprocess.Popen] = {}
        self.dir = os.path.join(WORK, "servers")
        self.apache_log = os.path.join(self.dir, "apache", "access.log")
        self.registry_log = os.path.join(self.dir, "registry.log")
        self.rate: Optional[str] = None

    @staticmethod
    def remove_leftovers() -> None:
        if NS in sh("ip", "netns", "list", check=False).stdout.decode():
            log(f"removing network namespace {NS} left by an earlier run")
            for pid in sh("ip", "netns", "pids", NS, check=False).stdout.decode().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", NS, check=False)
        sh("ip", "link", "del", VETH_HOST, check=False)

    def up(self) -> None:
        self.remove_leftovers()
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_SRV)
        sh("ip", "link", "set", VETH_SRV, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        sh("ip", "-n", NS, "addr", "add", f"{SRV_IP}/24", "dev", VETH_SRV)
        sh("ip", "-n", NS, "link", "set", VETH_SRV, "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        os.makedirs(self.dir, exist_ok=True)
        self._apache()
        self._registry()
        self._relay()

    def _apache(self) -> None:
        d = os.path.join(self.dir, "apache")
        os.makedirs(os.path.join(d, "htdocs", "check"), exist_ok=True)
        conf = os.path.join(d, "apache2.conf")
        mods = "/usr/lib/apache2/modules"
        with open(conf, "w") as f:
            f.write(f"""\
ServerRoot /etc/apache2
PidFile {d}/apache2.pid
Mutex file:{d}
Listen 127.0.0.1:8080
ServerName {NS}
User www-data
Group www-data
LoadModule mpm_event_module {mods}/mod_mpm_event.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule alias_module {mods}/mod_alias.so
ErrorLog {d}/error.log
LogFormat "%>s %B \\"%r\\"" bench
CustomLog {self.apache_log} bench
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 120
EnableSendfile On
ServerLimit 16
ThreadsPerChild 25
MaxRequestWorkers 400
DocumentRoot {d}/htdocs
Alias /cvmfs/{REPO} /srv/cvmfs/{REPO}
<Directory />
    Require all granted
</Directory>
""")
        logf = open(os.path.join(d, "stdout.log"), "ab")  # noqa: SIM115
        self.procs["apache2"] = subprocess.Popen(nsx("apache2", "-f", conf, "-DFOREGROUND"),
                                                 stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

    def _registry(self) -> None:
        data = os.path.join(IMAGE_CACHE, "registry")  # kept: reruns need not push again
        os.makedirs(data, exist_ok=True)
        cfg = os.path.join(self.dir, "registry.yml")
        with open(cfg, "w") as f:
            f.write("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {data}\n  delete:\n    enabled: true\n"
                    "http:\n  addr: 127.0.0.1:5001\n")
        logf = open(self.registry_log, "ab")  # noqa: SIM115
        self.procs["registry"] = subprocess.Popen(nsx("docker-registry", "serve", cfg),
                                                  stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

    def _relay(self) -> None:
        logf = open(os.path.join(self.dir, "relay.log"), "ab")  # noqa: SIM115
        self.procs["relay"] = subprocess.Popen(
            nsx(sys.executable, os.path.join(HERE, "delay_relay.py"), "--delay-ms",
                str(DELAY_MS), f"{SRV_IP}:80=127.0.0.1:8080", f"{SRV_IP}:5000=127.0.0.1:5001"),
            stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

        def answers() -> bool:
            for url in (f"http://{SRV_IP}/", f"http://{REGISTRY}/v2/"):
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                except urllib.error.HTTPError:
                    pass  # it answered
                except Exception:
                    return False
            return True

        wait_until(answers, 30, "apache2 and docker-registry through the relay")
        # cvmfs-thin --digests registry speaks plain HTTP to loopback registries only (as
        # Docker): the publisher reaches the same registry at 127.0.0.1 too.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.loopback_registry = f"127.0.0.1:{s.getsockname()[1]}"
        logf = open(os.path.join(self.dir, "relay-loopback.log"), "ab")  # noqa: SIM115
        self.procs["relay-loopback"] = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "delay_relay.py"), "--delay-ms", "0",
             f"{self.loopback_registry}={REGISTRY}"], stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        wait_until(lambda: socket_connects(self.loopback_registry), 30, "the loopback relay")

    def shape(self, rate: Optional[str]) -> None:
        """tbf at `rate` on both ends of the veth pair (None: unshaped)."""
        for prefix, dev in ((["tc"], VETH_HOST), (["tc", "-n", NS], VETH_SRV)):
            sh(*prefix, "qdisc", "del", "dev", dev, "root", check=False)
            if rate:
                bps = RATES[rate] / 8
                burst = max(64 * 1024, int(bps / 1000))  # >= a GSO packet, >= 1 ms
                limit = int(bps * 0.05) + burst  # 50 ms of queue
                sh(*prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                   "burst", str(burst), "limit", str(limit))
        self.rate = rate

    def qdiscs(self) -> str:
        return (sh("tc", "qdisc", "show", "dev", VETH_HOST).stdout.decode()
                + sh("tc", "-n", NS, "qdisc", "show", "dev", VETH_SRV).stdout.decode())

    @staticmethod
    def rx_bytes() -> int:
        with open(f"/sys/class/net/{VETH_HOST}/statistics/rx_bytes") as f:
            return int(f.read())

    def down(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()
        for pid in sh("ip", "netns", "pids", NS, check=False).stdout.decode().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", NS, check=False)
        sh("ip", "link", "del", VETH_HOST, check=False)


def socket_connects(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


class Meter:
    """Bytes from a point on: over the link, served by the stratum 0 and the registry."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.rx = link.rx_bytes()
        self.apache_at = os.path.getsize(link.apache_log) if os.path.exists(link.apache_log) else 0
        self.registry_at = os.path.getsize(link.registry_log)

    @staticmethod
    def _since(path: str, offset: int) -> str:
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def read(self) -> Dict[str, int]:
        time.sleep(0.3)  # apache writes its log line after the response
        apache = self._since(self.link.apache_log, self.apache_at)
        cvmfs = sum(int(n) for n in re.findall(
            rf'^\d+ (\d+) "GET /cvmfs/{re.escape(REPO)}/', apache, re.M))
        registry = sum(int(n) for n in re.findall(r'"GET [^"]*/blobs/sha256:[0-9a-f]+ '
                                                   r'HTTP/[^"]*" 200 (\d+)',
                                                   self._since(self.link.registry_log,
                                                               self.registry_at)))
        return {"link_rx": self.link.rx_bytes() - self.rx, "cvmfs_http": cvmfs,
                "registry_blobs": registry}


def shaping_check(link: Link, rate: Optional[str]) -> Dict[str, float]:
    """100 MB through the link, and the round trip of a small request on a kept-alive
    connection, as the CVMFS client makes them."""
    import http.client

    path = os.path.join(link.dir, "apache", "htdocs", "check", "100MB")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(os.urandom(100_000_000))
        with open(os.path.join(link.dir, "apache", "htdocs", "check", "small"), "wb") as f:
            f.write(b"x" * 100)
    rx0 = link.rx_bytes()
    r = sh("curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
           f"http://{SRV_IP}/check/100MB", timeout=120)
    secs, size = r.stdout.decode().split()
    rx = link.rx_bytes() - rx0
    conn = http.client.HTTPConnection(SRV_IP, 80, timeout=10)
    t0 = time.perf_counter()
    conn.request("GET", "/check/small")
    conn.getresponse().read()
    first = time.perf_counter() - t0
    rtts = []
    for _ in range(10):
        t0 = time.perf_counter()
        conn.request("GET", "/check/small")
        conn.getresponse().read()
        rtts.append(time.perf_counter() - t0)
    conn.close()
    out = {"rate": rate or "unshaped", "seconds_100MB": round(float(secs), 3),
           "bytes": int(size), "link_rx_bytes": rx,
           "mbit_s": round(int(size) * 8 / float(secs) / 1e6, 1),
           "request_rtt_ms_median": round(statistics.median(rtts) * 1000, 1),
           "first_request_new_connection_ms": round(first * 1000, 1)}
    log(f"shaping check {out}")
    return out


# ---------------------------------------------------------------------------- images


class BenchDockerd(Dockerd):
    """A private dockerd that pulls from the registry over the link (plain HTTP)."""

    def _config_file(self) -> str:
        path = os.path.join(self.root, "daemon.json")
        with open(path, "w") as f:
            json.dump({"insecure-registries": [REGISTRY]}, f)
        return path


def build_and_publish(work: str, link: Link) -> Dict[str, Dict]:
    """Build (or load from .cache/bench) both images, push them, publish them twice into
    bench.repo. Returns per image: refs and sizes."""
    os.makedirs(IMAGE_CACHE, exist_ok=True)
    builder = BenchDockerd(os.path.join(work, "builder"), "overlay2").start()
    info: Dict[str, Dict] = {}
    try:
        # tiny
        tiny_src = f"{REGISTRY}/bench/tiny:1"
        root = busybox_rootfs(os.path.join(work, "busybox-rootfs"))
        builder.docker("import", "-c", 'CMD ["true"]', "-", tiny_src, input=tar_of(root))
        # numpy
        key = hashlib.sha256(NUMPY_DOCKERFILE.encode()).hexdigest()[:12]
        saved = os.path.join(IMAGE_CACHE, f"numpy-{key}.tar")
        numpy_src = f"{REGISTRY}/bench/numpy:1"
        if os.path.exists(saved):
            log(f"loading the numpy image from {saved}")
            builder.docker("load", "-i", saved, timeout=900)
        else:
            raw_base = os.path.join(IMAGE_CACHE, "bookworm-minbase.tar")
            base = os.path.join(IMAGE_CACHE, "bookworm-minbase-clean.tar")
            if not os.path.exists(raw_base):
                log("debootstrap --variant=minbase bookworm (about a minute)")
                tmp = os.path.join(work, "minbase")
                sh("debootstrap", "--variant=minbase", "bookworm", tmp,
                   "http://deb.debian.org/debian", timeout=1800)
                sh("tar", "-C", tmp, "--numeric-owner", "-cf", raw_base + ".tmp", ".")
                os.replace(raw_base + ".tmp", raw_base)
                shutil.rmtree(tmp)
            if not os.path.exists(base):
                clean_base(raw_base, base)
            with open(base, "rb") as f:
                builder.docker("import", "-c", 'CMD ["bash"]', "-", "cgd-bench/minbase:1",
                               input=f.read(), timeout=900)
            ctx = os.path.join(work, "numpy-build")
            os.makedirs(ctx, exist_ok=True)
            with open(os.path.join(ctx, "Dockerfile"), "w") as f:
                f.write(NUMPY_DOCKERFILE)
            log("docker build of the numpy image (apt-get install python3-numpy)")
            r = subprocess.run(["docker", "-H", builder.host, "build", "--network", "host",
                                "-t", numpy_src, ctx], capture_output=True, timeout=1800,
                               env={**os.environ, "DOCKER_BUILDKIT": "0"})
            if r.returncode != 0:
                raise RuntimeError("docker build failed:\n" + r.stderr.decode()[-3000:]
                                   + r.stdout.decode()[-3000:])
            builder.docker("save", "-o", saved + ".tmp", numpy_src, timeout=900)
            os.replace(saved + ".tmp", saved)
        for name, src in (("numpy", numpy_src), ("tiny", tiny_src)):
            log(f"push {src}")
            builder.docker("push", src, timeout=1800)
            thin = f"{REGISTRY}/bench/{name}-thin:1"
            loop_src = src.replace(REGISTRY, link.loopback_registry)
            builder.docker("tag", src, loop_src)
            builder.docker("push", loop_src, timeout=1800)  # the same blobs: nothing moves
            for source, extra, tag in ((src, [], thin), (loop_src, ["--digests", "registry"],
                                                         f"cgd-bench/{name}-lazy:1")):
                log(f"cvmfs-thin convert {source} {' '.join(extra)} --store cvmfs:{REPO}")
                t0 = time.perf_counter()
                r = subprocess.run([CVMFS_THIN, "--docker-host", builder.host, "convert", source,
                                    "--store", f"cvmfs:{REPO}", "--repo", REPO,
                                    "--cvmfs-root", "/cvmfs", "--tag", tag, "--wait", "900",
                                    *extra, *(["--push"] if not extra else [])],
                                   capture_output=True, timeout=3600, cwd="/")
                if r.returncode != 0:
                    raise RuntimeError(f"cvmfs-thin convert failed:\n{r.stderr.decode()[-3000:]}"
                                       f"{r.stdout.decode()[-2000:]}")
                log(f"  published in {time.perf_counter() - t0:.1f} s")
            manifest = registry_manifest(f"bench/{name}", "1")
            layers = [lay["size"] for lay in manifest["layers"]]
            thin_manifest = registry_manifest(f"bench/{name}-thin", "1")
            info[name] = {
                "ref": src, "thin": thin,
                "layers": len(layers),
                "compressed_bytes": sum(layers) + manifest["config"]["size"],
                "layer_compressed_bytes": layers,
                "uncompressed_bytes": int(builder.out("image", "inspect", "--format",
                                                      "{{.Size}}", src)),
                "thin_image_bytes": sum(lay["size"] for lay in thin_manifest["layers"])
                + thin_manifest["config"]["size"],
                "files": int(builder.out("run", "--rm", "--network", "none", src, "sh", "-c",
                                         "find / -xdev -type f | wc -l").strip()),
            }
            log(f"{name}: {info[name]}")
    finally:
        builder.stop()
        wipe(builder.root)
    return info


def clean_base(src: str, dest: str) -> None:
    """The debootstrapped tree as a base image ships it: without apt's package lists and
    the .debs debootstrap downloaded (Debian's own images drop them too)."""
    import tarfile

    junk = re.compile(r"^\./var/(lib/apt/lists/[^/]+|cache/apt/archives/[^/]+\.deb|"
                      r"cache/apt/[^/]+\.bin)$")
    with tarfile.open(src) as tin, tarfile.open(dest + ".tmp", "w",
                                                format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            if junk.match(m.name) and not m.isdir():
                continue
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
    os.replace(dest + ".tmp", dest)


def registry_manifest(repo: str, tag: str) -> Dict:
    req = urllib.request.Request(
        f"http://{REGISTRY}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


# ---------------------------------------------------------------------------- a node


def cvmfs_fresh_mount(link: Link) -> Dict[str, float]:
    """The worker's CVMFS client: unmounted, its cache emptied, mounted again."""
    cvmfs_umount()
    shutil.rmtree(CACHE, ignore_errors=True)
    meter = Meter(link)
    t0 = time.perf_counter()
    sh("bash", CVMFS_SH, "mount", REPO, MNT, CACHE,
       env={"CVMFS_STRATUM0_URL": f"http://{SRV_IP}/cvmfs/@fqrn@"})
    os.listdir(MNT)
    return {"mount_s": time.perf_counter() - t0, **{f"mount_{k}": v for k, v in
                                                     meter.read().items()}}


def cvmfs_umount() -> None:
    if not os.path.ismount(MNT):
        return
    for _ in range(20):
        if sh("umount", MNT, check=False).returncode == 0:
            return
        time.sleep(0.5)
    users = sh("fuser", "-vm", MNT, check=False)
    raise RuntimeError(f"cannot unmount {MNT} (busy):\n{users.stderr.decode()}")


def wipe(path: str) -> None:
    """Remove a tree after unmounting whatever daemons left mounted below it (dockerd's
    netns bind mounts, overlay mounts)."""
    from containerd_harness import unmount_below

    if os.path.exists(path):
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def cache_bytes() -> Dict[str, int]:
    """What the CVMFS client cache holds after the cold start: file contents and catalogs
    (objects named by their hash, stored uncompressed; catalogs are SQLite files)."""
    out = {"data": 0, "catalogs": 0}
    for dirpath, _, files in os.walk(CACHE):
        if not re.fullmatch(r"[0-9a-f]{2}", os.path.basename(dirpath)):
            continue
        for name in files:
            if not re.fullmatch(r"[0-9a-f]{38,}[A-Z]?", name):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                head = f.read(16)
            kind = "catalogs" if head == b"SQLite format 3\0" else "data"
            out[kind] += os.lstat(path).st_size
    return out


class Node:
    """A fresh worker for one variant: its own daemons, nothing pulled, CVMFS cache empty."""

    def __init__(self, variant: str, root: str, link: Link, lazypull: str) -> None:
        self.variant, self.root, self.link, self.lazypull = variant, root, link, lazypull
        self.dockerd: Optional[Dockerd] = None
        self.driver: Optional[DriverProcess] = None
        self.snap: Optional[Daemon] = None
        self.ctrd: Optional[Containerd] = None
        self.mount_info: Dict[str, float] = {}
        self.n = 0

    def start(self) -> Node:
        os.makedirs(self.root, exist_ok=True)
        v = self.variant
        if v in ("thin", "lazy"):
            self.mount_info = cvmfs_fresh_mount(self.link)
        if v == "thin":
            self.driver = DriverProcess(PLUGIN, os.path.join(self.root, "driver"), [
                "--cvmfs-root", MNT_BASE, "--repositories", REPO, "--log-level", "info"]).start()
            self.dockerd = BenchDockerd(os.path.join(self.root, "dockerd"), PLUGIN).start()
        elif v == "full":
            self.dockerd = BenchDockerd(os.path.join(self.root, "dockerd"), "overlay2").start()
        elif v == "lazy":
            self.snap = Daemon(os.path.join(self.root, "sn"), extra=[
                "--cvmfs-root", MNT_BASE, "--repositories", REPO, "--log-level", "info"]).start()
            self.ctrd = Containerd(os.path.join(self.root, "ctrd"), self.snap.socket).start()
        elif v == "full-ctrd":
            self.ctrd = Containerd(os.path.join(self.root, "ctrd"),
                                   os.path.join(self.root, "no-snapshotter.sock")).start()
        return self

    def stop(self) -> None:
        for stop in (self.ctrd and self.ctrd.stop, self.snap and self.snap.stop,
                     self.dockerd and self.dockerd.stop, self.driver and self.driver.stop):
            if stop:
                with contextlib.suppress(Exception):
                    stop()
        wipe(self.root)
        cvmfs_umount()

    def pull(self, image: Dict) -> float:
        t0 = time.perf_counter()
        if self.variant == "thin":
            self.dockerd.docker("pull", image["thin"], timeout=1800)
        elif self.variant == "full":
            self.dockerd.docker("pull", image["ref"], timeout=1800)
        else:
            snapshotter = "cvmfs" if self.variant == "lazy" else "overlayfs"
            sh(self.lazypull, "-address", self.ctrd.address, "-namespace", NAMESPACE,
               "-snapshotter", snapshotter, "-plain-http", image["ref"], timeout=1800)
        return time.perf_counter() - t0

    def run_argv(self, image: Dict, cmd: List[str]) -> List[str]:
        self.n += 1
        if self.variant in ("thin", "full"):
            ref = image["thin"] if self.variant == "thin" else image["ref"]
            return ["docker", "-H", self.dockerd.host, "run", "--rm", "--network", "none",
                    ref, *cmd]
        snapshotter = "cvmfs" if self.variant == "lazy" else "overlayfs"
        return ["ctr", "--address", self.ctrd.address, "--namespace", NAMESPACE, "run", "--rm",
                "--snapshotter", snapshotter, image["ref"], f"c{os.getpid()}-{self.n}", *cmd]


def timed(argv: List[str], t0: Optional[float] = None) -> Tuple[float, float, str]:
    """Run argv; (seconds to its first line of output or, with none, its exit; seconds to
    its exit; the first line), from t0 (default: now)."""
    t0 = time.perf_counter() if t0 is None else t0
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline()
    first = time.perf_counter() - t0
    rest, err = p.communicate(timeout=1800)
    end = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {err.decode()[-2000:]}")
    return (first if line else end), end, line.decode().strip()


def cold_and_warm(node: Node, image: Dict, cmd: List[str]) -> Dict:
    meter = Meter(node.link)
    pull = node.pull(image)
    first, end, line = timed(node.run_argv(image, cmd))
    got = meter.read()
    cache = cache_bytes() if node.variant in ("thin", "lazy") else {}
    warm = [timed(node.run_argv(image, cmd))[0] for _ in range(3)]
    return {"pull_s": pull, "run_first_s": first, "cold_s": pull + first,
            "cold_exit_s": pull + end, "load1": os.getloadavg()[0],
            "output": line, "warm_s": statistics.median(warm), "warm_runs_s": warm,
            "cvmfs_cache_bytes": cache.get("data", 0) + cache.get("catalogs", 0),
            "cvmfs_cache_data_bytes": cache.get("data", 0),
            "cvmfs_cache_catalog_bytes": cache.get("catalogs", 0), **got, **node.mount_info}


def concurrent(node: Node, image: Dict, cmd: List[str], n: int) -> Dict:
    meter = Meter(node.link)
    pull = node.pull(image)
    t0 = time.perf_counter()
    results: List[Optional[Tuple[float, float, str]]] = [None] * n
    errors: List[str] = []
    argvs = [node.run_argv(image, cmd) for _ in range(n)]

    def one(i: int) -> None:
        try:
            results[i] = timed(argvs[i], t0)
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent starts failed: {errors[0]}")
    firsts = [r[0] for r in results if r]
    got = meter.read()
    return {"pull_s": pull, "all_first_s": max(firsts),
            "median_first_s": statistics.median(firsts), "total_s": pull + max(firsts),
            "load1": os.getloadavg()[0], **got}


# ---------------------------------------------------------------------------- report


def spread(xs: List[float]) -> Dict[str, float]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
            "max": round(max(xs), 3), "n": len(xs)}


def summarize(raw: Dict, images: Dict) -> Dict:
    out: Dict = {}
    for rate, by_image in raw["cold"].items():
        for name, by_variant in by_image.items():
            img = images[name]
            for v, runs in by_variant.items():
                s = {k: spread([r[k] for r in runs]) for k in
                     ("cold_s", "pull_s", "run_first_s", "warm_s", "link_rx", "cvmfs_http",
                      "registry_blobs", "cvmfs_cache_bytes", "cvmfs_cache_data_bytes",
                      "cvmfs_cache_catalog_bytes")}
                s["link_rx_pct_of_compressed"] = round(
                    100 * s["link_rx"]["median"] / img["compressed_bytes"], 2)
                s["cvmfs_http_pct_of_compressed"] = round(
                    100 * s["cvmfs_http"]["median"] / img["compressed_bytes"], 2)
                s["cvmfs_cache_data_pct_of_uncompressed"] = round(
                    100 * s["cvmfs_cache_data_bytes"]["median"] / img["uncompressed_bytes"], 2)
                out.setdefault(rate, {}).setdefault(name, {})[v] = s
            vs = out[rate][name]
            for s in vs.values():
                s["cold_vs_full"] = round(s["cold_s"]["median"] / vs["full"]["cold_s"]["median"], 3)
                s["warm_vs_full"] = round(s["warm_s"]["median"] / vs["full"]["warm_s"]["median"], 3)
                if "full-ctrd" in vs:
                    base = vs["full-ctrd"]
                    s["cold_vs_full_ctrd"] = round(s["cold_s"]["median"]
                                                   / base["cold_s"]["median"], 3)
                    s["warm_vs_full_ctrd"] = round(s["warm_s"]["median"]
                                                   / base["warm_s"]["median"], 3)
    conc: Dict = {}
    for rate, by_variant in raw.get("concurrent", {}).items():
        for v, runs in by_variant.items():
            conc.setdefault(rate, {})[v] = {k: spread([r[k] for r in runs]) for k in
                                            ("total_s", "pull_s", "all_first_s",
                                             "median_first_s", "link_rx")}
        vs = conc[rate]
        for s in vs.values():
            s["total_vs_full"] = round(s["total_s"]["median"] / vs["full"]["total_s"]["median"], 3)
    return {"cold_warm": out, "concurrent": conc}


def mb(x: float) -> str:
    return f"{x / 1e6:.1f}" if x >= 1e5 else f"{x / 1e6:.3f}"


def markdown(doc: Dict) -> str:
    s, images = doc["summary"], doc["images"]
    lines = [
        "# Lazy starts over a shaped network",
        "",
        f"`{doc['command']}`, {doc['date']}, {doc['machine']['cpu']}, "
        f"kernel {doc['machine']['kernel']}, load average before {doc['machine']['load_before']}"
        f", after {doc['machine'].get('load_after', '?')}. {doc['rounds']} round(s) per rate, "
        "variants alternated; medians (min–max). Raw figures: [shaped.json](shaped.json).",
        "",
        "The link: servers (apache2 with the stratum 0's files, docker-registry) in a network "
        "namespace behind a veth pair; rate by `tbf` on both veth ends; RTT 10 ms by "
        "bench/delay_relay.py (5 ms each way; the kernel has no netem). A fresh node per "
        "cold start (new daemons, nothing pulled, empty CVMFS cache); warm = the same start "
        "again on that node (image present, CVMFS cache hot).",
        "",
        "Shaping check (100 MB through the link; round trip of a small request on a "
        "kept-alive connection):",
        "",
        "| link | 100 MB took | throughput | request round trip | first request, new connection |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in doc["shaping_check"]:
        lines.append(f"| {c['rate']} | {c['seconds_100MB']:.2f} s | {c['mbit_s']} Mbit/s | "
                     f"{c['request_rtt_ms_median']} ms | "
                     f"{c['first_request_new_connection_ms']} ms |")
    lines += ["", "Images:", "", "| image | runs | layers | compressed (registry) | "
              "uncompressed | files | thin image |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, img in images.items():
        lines.append(f"| {name} | {IMAGES[name]['what']} | {img['layers']} | "
                     f"{mb(img['compressed_bytes'])} MB | {mb(img['uncompressed_bytes'])} MB | "
                     f"{img['files']} | {img['thin_image_bytes']} B |")
    names = {"thin": "thin image (graph driver)", "lazy": "lazy pull (snapshotter)",
             "full": "full pull, dockerd overlay2", "full-ctrd": "full pull, containerd overlayfs"}
    for rate, by_image in s["cold_warm"].items():
        for name, vs in by_image.items():
            img = images[name]
            lines += ["", f"### {name} at {rate}", "",
                      "| variant | cold start to first output | / full (overlay2) | "
                      "/ containerd overlayfs | MB over the link | % of the compressed image | "
                      "CVMFS cache: file data MB (% of uncompressed) + catalogs MB | warm start | "
                      "warm / overlay2 |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
            for v, r in vs.items():
                c = r["cold_s"]
                w = r["warm_s"]
                cache = (f"{mb(r['cvmfs_cache_data_bytes']['median'])} "
                         f"({r['cvmfs_cache_data_pct_of_uncompressed']} %) + "
                         f"{mb(r['cvmfs_cache_catalog_bytes']['median'])}"
                         if v in ("thin", "lazy") else "–")
                lines.append(
                    f"| {names[v]} | {c['median']:.2f} s ({c['min']:.2f}–{c['max']:.2f}) | "
                    f"{r['cold_vs_full']:.3f} | {r.get('cold_vs_full_ctrd', float('nan')):.3f} | "
                    f"{mb(r['link_rx']['median'])} | {r['link_rx_pct_of_compressed']} | {cache} | "
                    f"{w['median']:.3f} s ({w['min']:.3f}–{w['max']:.3f}) | "
                    f"{r['warm_vs_full']:.2f} |")
            del img
    if s["concurrent"]:
        lines += ["", f"### {doc['concurrent_n']} cold starts at once (numpy), one node", "",
                  "Pull, then all containers started together; time to the last one's first "
                  "line of output.", "",
                  "| link | variant | pull + all started | pull | starts (last / median) | "
                  "/ full | MB over the link |", "| --- | --- | --- | ---: | --- | ---: | ---: |"]
        for rate, vs in s["concurrent"].items():
            for v, r in vs.items():
                t = r["total_s"]
                lines.append(f"| {rate} | {names[v]} | {t['median']:.2f} s ({t['min']:.2f}–"
                             f"{t['max']:.2f}) | {r['pull_s']['median']:.2f} s | "
                             f"{r['all_first_s']['median']:.2f} / "
                             f"{r['median_first_s']['median']:.2f} s | "
                             f"{r['total_vs_full']:.3f} | {mb(r['link_rx']['median'])} |")
    lines += ["", "Columns: MB over the link = bytes the worker's veth received during pull + "
              "first run (stratum 0 and registry, TCP/IP headers included; the CVMFS "
              "mount's own manifest and root catalog, fetched before the clock starts, are "
              "in shaped.json as mount_*); % of the compressed image = that / the image's "
              "registry size (what a full pull moves); CVMFS cache = the client cache after "
              "the start: file contents (stored uncompressed) against the image's "
              "uncompressed size (Slacker's 6.4 % is of this kind), plus the catalogs "
              "(SQLite, per layer) it read; warm start = median of 3 more runs on the same "
              "node.", ""]
    return "\n".join(lines)


def plots(doc: Dict) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (.venv/bin/pip install matplotlib)")
        return []
    s = doc["summary"]["cold_warm"]
    rates = list(s)
    names = list(next(iter(s.values())))
    colors = {"thin": "#1f77b4", "lazy": "#2ca02c", "full": "#d62728", "full-ctrd": "#ff7f0e"}
    out = []

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        width = 0.8 / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            xs, ys, lo, hi = [], [], [], []
            for j, rate in enumerate(rates):
                r = s[rate][name].get(v)
                if not r:
                    continue
                c = r["cold_s"]
                xs.append(j + (i - (len(VARIANTS) - 1) / 2) * width)
                ys.append(c["median"])
                lo.append(c["median"] - c["min"])
                hi.append(c["max"] - c["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=v, color=colors[v])
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.1f}" if y >= 1 else f"{y:.2f}", ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(rates)))
        ax.set_xticklabels(rates)
        ax.set_ylabel("cold start to first output (s)")
        ax.set_title(f"{name}: {IMAGES[name]['what']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(RESULTS, "shaped-cold.png")
    fig.savefig(p, dpi=110)
    out.append(p)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    rate = rates[0]
    for ax, name in zip(axes[0], names):
        img = doc["images"][name]
        labels, vals = [], []
        for v in VARIANTS:
            r = s[rate][name].get(v)
            if r:
                labels.append(v)
                vals.append(r["link_rx"]["median"] / 1e6)
        ax.bar(labels, vals, color=[colors[v] for v in labels])
        for x, y in enumerate(vals):
            ax.text(x, y, f"{y:.1f} MB" if y >= 0.1 else f"{y * 1000:.0f} kB", ha="center",
                    va="bottom", fontsize=8)
        ax.axhline(img["compressed_bytes"] / 1e6, ls="--", color="gray",
                   label=f"image, compressed {img['compressed_bytes'] / 1e6:.0f} MB")
        ax.axhline(img["uncompressed_bytes"] / 1e6, ls=":", color="black",
                   label=f"image, uncompressed {img['uncompressed_bytes'] / 1e6:.0f} MB")
        ax.set_ylabel(f"MB over the link, cold start ({rate})")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(RESULTS, "shaped-bytes.png")
    fig.savefig(p, dpi=110)
    out.append(p)
    plt.close(fig)

    conc = doc["summary"]["concurrent"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs, ys = [], []
        for j, (rate, name) in enumerate((r, n) for r in rates for n in names):
            w = s[rate][name].get(v)
            if w:
                xs.append(j + (i - (len(VARIANTS) - 1) / 2) * width)
                ys.append(w["warm_s"]["median"])
        ax.bar(xs, ys, width, label=v, color=colors[v])
    ax.set_xticks(range(len(rates) * len(names)))
    ax.set_xticklabels([f"{n}\n{r}" for r in rates for n in names], fontsize=8)
    ax.set_ylabel("warm start (s)")
    ax.set_title("warm start: image present, CVMFS cache hot", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    if conc:
        width = 0.8 / len(CONCURRENT_VARIANTS)
        for i, v in enumerate(CONCURRENT_VARIANTS):
            xs, ys = [], []
            for j, rate in enumerate(conc):
                r = conc[rate].get(v)
                if r:
                    xs.append(j + (i - (len(CONCURRENT_VARIANTS) - 1) / 2) * width)
                    ys.append(r["total_s"]["median"])
            ax.bar(xs, ys, width, label=v, color=colors[v])
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(conc)))
        ax.set_xticklabels(list(conc))
        ax.set_ylabel("pull + 10 starts to the last first output (s)")
        ax.set_title(f"{doc['concurrent_n']} cold starts at once (numpy)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(RESULTS, "shaped-warm-concurrent.png")
    fig.savefig(p, dpi=110)
    out.append(p)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- main


def versions() -> Dict[str, str]:
    def first(*argv: str) -> str:
        r = subprocess.run(list(argv), capture_output=True, text=True)
        return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"

    return {"dockerd": first("dockerd", "--version"),
            "containerd": first("containerd", "--version"),
            "cvmfs": first("cvmfs2", "--version"),
            "apache2": first("apache2", "-v"),
            "docker-registry": first("docker-registry", "--version"),
            "cvmfs-graphdriver": subprocess.run(["git", "-C", TOP, "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip()}


def machine() -> Dict[str, str]:
    h = host_facts()
    return {"host": platform.node(), "cpu": f"{h['cpus']} x {h['cpu_model']}, "
            f"{h['mem_gib']} GiB", "kernel": h["kernel"], "load_before": h["load"]}


def build_go_tool(name: str) -> str:
    out = sh("bash", os.path.join(TOP, "scripts", "build-go-tool.sh"), name, timeout=1800)
    return out.stdout.decode().strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 100 Mbit/s only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--images", default="numpy,tiny")
    ap.add_argument("--concurrent", type=int, default=10, help="cold starts at once (0: skip)")
    ap.add_argument("--check-only", action="store_true", help="only the shaping check")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plots and shaped.md from bench/results/shaped.json")
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(RESULTS, "shaped.json")) as f:
            doc = json.load(f)
        with open(os.path.join(RESULTS, "shaped.md"), "w") as f:
            f.write(markdown(doc))
        for p in plots(doc):
            log(f"wrote {p}")
        return 0
    if args.quick:
        args.rounds, args.rates = 1, "100mbit"
    rates = args.rates.split(",")
    image_names = args.images.split(",")
    if os.geteuid() != 0:
        sys.exit("bench/shaped_starts.py needs root (network namespaces, tc, mounts, daemons)")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    argv = " ".join(a for a in sys.argv[1:])
    doc: Dict = {"command": f"sudo .venv/bin/python bench/shaped_starts.py {argv}".strip(),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "machine": machine(), "versions": versions(), "rounds": args.rounds,
                 "rates": rates, "rtt_ms": 2 * DELAY_MS, "concurrent_n": args.concurrent,
                 "shaping": "tbf on both veth ends (rate); delay_relay.py 5 ms each way (RTT)"}
    cvmfs_umount_quiet()
    wipe(WORK)
    os.makedirs(WORK)
    os.chmod(WORK, 0o755)
    link = Link()
    nodes: List[Node] = []
    raw: Dict = {"cold": {}, "concurrent": {}}
    try:
        log(f"stratum 0 {REPO}: scripts/cvmfs.sh stratum0 {REPO}")
        sh("bash", CVMFS_SH, "stratum0", REPO, timeout=600)
        link.up()
        checks = []
        link.shape(None)
        checks.append(shaping_check(link, None))
        for rate in RATES if not args.quick else rates:
            link.shape(rate)
            checks.append(shaping_check(link, rate))
        doc["shaping_check"] = checks
        doc["qdiscs_example"] = link.qdiscs()
        if args.check_only:
            print(json.dumps(checks, indent=2))
            return 0
        link.shape(None)
        lazypull = build_go_tool("lazypull")
        images = build_and_publish(WORK, link)
        images = {k: images[k] for k in image_names}
        doc["images"] = images
        k = 0
        for rate in rates:
            link.shape(rate)
            log(f"link shaped to {rate}")
            for r in range(args.rounds):
                for name in image_names:
                    order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                    if (r // len(VARIANTS)) % 2:
                        order.reverse()
                    for v in order:
                        k += 1
                        node = Node(v, os.path.join(WORK, "nodes", f"n{k}"), link, lazypull)
                        nodes.append(node)
                        node.start()
                        res = cold_and_warm(node, images[name], IMAGES[name]["cmd"])
                        node.stop()
                        nodes.remove(node)
                        raw["cold"].setdefault(rate, {}).setdefault(name, {}).setdefault(
                            v, []).append(res)
                        log(f"{rate} round {r + 1} {name} {v}: cold {res['cold_s']:.2f} s "
                            f"(pull {res['pull_s']:.2f}), warm {res['warm_s']:.3f} s, "
                            f"link {res['link_rx'] / 1e6:.1f} MB, "
                            f"cvmfs {res['cvmfs_http'] / 1e6:.1f} MB, "
                            f"registry {res['registry_blobs'] / 1e6:.1f} MB, "
                            f"cache {res['cvmfs_cache_data_bytes'] / 1e6:.1f} MB data + "
                            f"{res['cvmfs_cache_catalog_bytes'] / 1e6:.1f} MB catalogs; "
                            f"{res['output']!r}")
                if args.concurrent and "numpy" in image_names:
                    order = CONCURRENT_VARIANTS if r % 2 == 0 else CONCURRENT_VARIANTS[::-1]
                    for v in order:
                        k += 1
                        node = Node(v, os.path.join(WORK, "nodes", f"n{k}"), link, lazypull)
                        nodes.append(node)
                        node.start()
                        res = concurrent(node, images["numpy"], IMAGES["numpy"]["cmd"],
                                         args.concurrent)
                        node.stop()
                        nodes.remove(node)
                        raw["concurrent"].setdefault(rate, {}).setdefault(v, []).append(res)
                        log(f"{rate} round {r + 1} {args.concurrent} at once {v}: "
                            f"{res['total_s']:.2f} s (pull {res['pull_s']:.2f}, last start "
                            f"{res['all_first_s']:.2f}), link {res['link_rx'] / 1e6:.1f} MB")
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()
        cvmfs_umount_quiet()
        link.down()
        wipe(WORK)
    doc["machine"]["load_after"] = machine()["load_before"]
    doc["raw"] = raw
    doc["summary"] = summarize(raw, images)
    md = markdown(doc)
    print(md)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "shaped.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        with open(os.path.join(RESULTS, "shaped.md"), "w") as f:
            f.write(md)
        for p in plots(doc):
            log(f"wrote {p}")
    return 0


def cvmfs_umount_quiet() -> None:
    if os.path.ismount(MNT) and sh("umount", MNT, check=False).returncode != 0:
        sh("umount", "-l", MNT, check=False)


if __name__ == "__main__":
    raise SystemExit(main())
