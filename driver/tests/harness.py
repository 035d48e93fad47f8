"""Real components for the integration tests: the driver daemon, private dockerds, a registry.

Everything runs on this machine only (unix sockets and 127.0.0.1), each dockerd with its
own data-root, exec-root, socket and pidfile, and `--bridge=none` so several can coexist.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

PLUGIN_DIR = "/run/docker/plugins"


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI, CI=true) when a test's requirement is missing:
    nothing passes silently for want of a component."""
    if condition:
        return
    import pytest

    if IN_CI:
        pytest.fail(f"requirement missing in CI: {reason}")
    pytest.skip(reason)


def wait_until(cond, timeout: float, what: str, log: Optional[str] = None) -> None:
    """Poll `cond` until true; on timeout, fail naming `what` (with the tail of `log`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    tail = ""
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = "\n--- log tail ---\n" + "".join(f.readlines()[-40:])
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{tail}")


def settle(probe: Callable[[], Any], want: Any, seconds: float = 10) -> Any:
    """`probe()` once it equals `want` (threads and descriptors of a finished request
    go a moment after its answer), or its last value after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        got = probe()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def staging_left(home: str, timeout: float = 30) -> List[str]:
    """What stays in the driver home's .staging once the freeing of removed containers'
    files, which the driver does after their Remove has returned (reaper.py), has had up
    to `timeout` seconds: anything left is a leak."""
    staging = os.path.join(home, ".staging")
    return settle(lambda: sorted(os.listdir(staging)) if os.path.isdir(staging) else [],
                  [], timeout)


def socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def plugin_answers(path: str) -> bool:
    """Whether the daemon on `path` answers a call (the socket accepts connections as soon
    as it is bound, before the daemon has resumed its state and serves)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
            s.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n"
                      b"Content-Length: 0\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} is not installed: the integration tests need it (.ci/run installs it)"
        )
    return path


def need_docker(busybox: bool = False) -> None:
    """Root and the Docker tools a test starts privately (and busybox-static, of which
    the tests build their images), or the test is skipped here and fails under CI."""
    need(os.geteuid() == 0, "needs root to run dockerd")
    for tool in ("dockerd", "docker", "docker-registry"):
        try:
            require_tool(tool)
        except RuntimeError as e:
            need(False, str(e))
    if busybox:
        need(os.path.exists("/bin/busybox"), "busybox-static is not installed")


# ---------------------------------------------------------------------------- driver


@dataclass
class DriverProcess:
    """The cvmfs-graphdriver daemon under test, as dockerd would find it."""

    name: str
    workdir: str
    extra_args: List[str] = field(default_factory=list)
    proc: Optional[subprocess.Popen] = None

    @property
    def socket(self) -> str:
        return os.path.join(PLUGIN_DIR, f"{self.name}.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "driver.log")

    def start(self) -> DriverProcess:
        os.makedirs(self.workdir, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cvmfs_graphdriver", "serve", "--socket", self.socket,
             "--log-level", "debug", *self.extra_args],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        logf.close()
        wait_until(lambda: self.proc.poll() is not None or plugin_answers(self.socket), 15,
              f"driver socket {self.socket}", self.log_path)
        if self.proc.poll() is not None:
            raise RuntimeError(f"driver exited with {self.proc.returncode}; see {self.log_path}")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(FileNotFoundError):
            if not socket_answers(self.socket):
                os.unlink(self.socket)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


# ---------------------------------------------------------------------------- dockerd


class DockerError(RuntimeError):
    pass


@dataclass
class Dockerd:
    """A private dockerd; `docker(...)` runs the CLI against it."""

    root: str
    storage_driver: str
    proc: Optional[subprocess.Popen] = None

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    @property
    def data_root(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "dockerd.log")

    def start(self) -> Dockerd:
        require_tool("dockerd")
        os.makedirs(self.root, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            ["dockerd", "--experimental", "-s", self.storage_driver,
             "--data-root", self.data_root, "--exec-root", os.path.join(self.root, "exec"),
             "-H", self.host, "--pidfile", os.path.join(self.root, "dockerd.pid"),
             "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false",
             "--config-file", self._config_file()],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        logf.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                return True
            r = subprocess.run(["docker", "-H", self.host, "version", "--format",
                                "{{.Server.Version}}"], capture_output=True)
            return r.returncode == 0

        wait_until(up, 60, f"dockerd ({self.storage_driver})", self.log_path)
        if self.proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {self.proc.returncode}; "
                               f"see {self.log_path}:\n{self._log_tail()}")
        return self

    def _config_file(self) -> str:
        path = os.path.join(self.root, "daemon.json")
        with open(path, "w") as f:
            json.dump({}, f)
        return path

    def _log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def docker(self, *args: str, input: Optional[bytes] = None, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker", "-H", self.host, *args], input=input,
                           capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} failed ({r.returncode}):\n"
                f"{r.stderr.decode(errors='replace')}{r.stdout.decode(errors='replace')[-2000:]}"
            )
        return r

    def out(self, *args: str, **kw) -> str:
        return self.docker(*args, **kw).stdout.decode()

    def info(self) -> Dict:
        return json.loads(self.out("info", "--format", "{{json .}}"))


# ---------------------------------------------------------------------------- registry


@dataclass
class Registry:
    root: str
    port: int = 0
    proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        binary = require_tool("docker-registry")
        os.makedirs(self.root, exist_ok=True)
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        cfg = os.path.join(self.root, "config.yml")
        with open(cfg, "w") as f:
            f.write(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {self.root}/data\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.address}\n"
            )
        logf = open(os.path.join(self.root, "registry.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, "serve", cfg], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(up, 20, "docker-registry", os.path.join(self.root, "registry.log"))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ---------------------------------------------------------------------------- images

BUSYBOX_APPLETS = (
    "sh ls cat echo true false rm rmdir mkdir touch ln id stat sleep chmod chown mv "
    "cp find sort head tail wc sync printf test env mknod mkfifo readlink md5sum "
    "sha256sum xargs grep sed dd du tar date seq yes uname"
).split()


def busybox_rootfs(dest: str) -> str:
    """A minimal root filesystem: the static busybox and its applet links."""
    busybox = "/bin/busybox"
    if not os.path.exists(busybox):
        raise RuntimeError("busybox-static is not installed: apt-get install busybox-static")
    os.makedirs(os.path.join(dest, "bin"), exist_ok=True)
    for d in ("etc", "tmp", "root", "proc", "sys", "dev", "var/empty"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(dest, "bin", "busybox"))
    for applet in BUSYBOX_APPLETS:
        link = os.path.join(dest, "bin", applet)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    with open(os.path.join(dest, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(dest, "etc", "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    return dest


def tar_of(directory: str) -> bytes:
    r = subprocess.run(["tar", "-C", directory, "--numeric-owner", "--xattrs",
                        "--xattrs-include=*", "-c", "."], capture_output=True, check=True)
    return r.stdout


def import_busybox(dockerd: Dockerd, workdir: str, tag: str = "busybox:test") -> str:
    root = busybox_rootfs(os.path.join(workdir, "busybox-rootfs"))
    dockerd.docker("import", "-c", 'CMD ["/bin/sh"]', "-", tag, input=tar_of(root))
    return tag


@contextlib.contextmanager
def running(d: Dockerd, *args: str) -> Iterator[str]:
    cid = d.out("run", "-d", "--network", "none", *args).strip()
    try:
        yield cid
    finally:
        d.docker("rm", "-f", cid, check=False)


def export_manifest(data: bytes) -> Dict[str, tuple]:
    """What a user compares in an exported filesystem: everything but times."""
    import hashlib
    import io

    out: Dict[str, tuple] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for m in tf:
            name = m.name.rstrip("/")
            if m.isreg():
                f = tf.extractfile(m)
                digest = hashlib.sha256(f.read() if f else b"").hexdigest()
            else:
                digest = ""
            xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            kind = m.type.decode() if isinstance(m.type, bytes) else str(m.type)
            link = m.linkname if (m.issym() or m.islnk()) else ""
            dev = (m.devmajor, m.devminor) if m.ischr() else (0, 0)
            out[name] = (kind, oct(m.mode), m.uid, m.gid, m.size, digest, link, *dev, xattrs)
    return out


# ---------------------------------------------------------------------------- CernVM-FS

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
CVMFS_SH = os.path.join(TOP, "scripts", "cvmfs.sh")


def real_cvmfs_available() -> bool:
    """A real CVMFS client and server on this machine (scripts/cvmfs.sh install)."""
    return all(shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin")
               for t in ("cvmfs_server", "cvmfs2", "cvmfs_talk", "mount.cvmfs"))


class CvmfsRepos:
    """The repositories the thin-image tests read, at `root/<repo>` (the driver's CVMFS
    root).

    Real (the default where scripts/cvmfs.sh installed CernVM-FS): each repository lives
    on a stratum 0 on this machine (its own writable view at /cvmfs/<repo>) and is read
    through a real client mount at root/<repo>, which is what the driver reads.
    `put_tree()` and `delete()` publish as DUCC does (`cvmfs_server ingest`); `refresh()`
    makes the client see a new revision at once instead of at its TTL.

    Stand-in (no CernVM-FS here; CI refuses it): each repository is a directory
    (`stores[repo]`) bind-mounted read-only at root/<repo>, written directly.

    `plain` repositories are always directories: the `dir:` layer store's own case (a
    tree on a shared filesystem), not a stand-in for CVMFS.
    """

    def __init__(self, workdir: str, repos: List[str], plain: List[str], real: bool) -> None:
        # The client runs as user cvmfs: its mount points and cache cannot be below
        # pytest's 0700 tmp.
        self.base = f"/var/tmp/cgd-cvmfs-{os.getpid()}"
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.root = os.path.join(self.base, "cvmfs")
        self.real = real
        self.cache = os.path.join(self.base, "cache")
        self.repos = list(repos)
        self.plain = list(plain)
        self.stores: Dict[str, str] = {}
        for repo in ([] if real else repos) + plain:
            self.stores[repo] = os.path.join(workdir, "publisher", repo)
            os.makedirs(self.stores[repo], exist_ok=True)

    # what cvmfs-thin publishes with, and where its `has` looks
    def store_args(self, repo: str) -> List[str]:
        if repo in self.stores:
            return ["--store", f"dir:{self.stores[repo]}", "--repo", repo]
        return ["--store", f"cvmfs:{repo}", "--cvmfs-root", "/cvmfs"]

    def publisher_view(self, repo: str) -> str:
        return self.stores.get(repo) or os.path.join("/cvmfs", repo)

    def _sh(self, *args: str) -> None:
        r = subprocess.run(["bash", CVMFS_SH, *args], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/cvmfs.sh {' '.join(args)} failed:\n{r.stderr}")

    def start(self) -> CvmfsRepos:
        if self.real:
            self._sh("stratum0", *self.repos)
        for repo in self.repos + self.plain:
            self.mount(repo)
        return self

    def mount(self, repo: str) -> None:
        mnt = os.path.join(self.root, repo)
        os.makedirs(mnt, exist_ok=True)
        if repo in self.stores:
            subprocess.run(["mount", "--bind", self.stores[repo], mnt], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", mnt], check=True)
        else:
            self._sh("mount", repo, mnt, self.cache)

    def unmount(self, repo: str) -> None:
        mnt = os.path.join(self.root, repo)
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)

    def refresh(self, repo: str) -> None:
        if repo not in self.stores:
            self._sh("remount", os.path.join(self.root, repo), self.cache)

    def server(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["cvmfs_server", *args], capture_output=True, text=True,
                              timeout=600, check=check, cwd="/")

    def put_tree(self, repo: str, base_dir: str, tree: str) -> None:
        """Publish the contents of `tree` at base_dir, as DUCC does: `cvmfs_server ingest`
        of a tar (a transaction's publish would drop literal `.wh.*` files, which ingest
        keeps), with the owners kept (-k; DUCC itself does not pass it)."""
        if repo in self.stores:
            dest = os.path.join(self.stores[repo], base_dir)
            os.makedirs(dest, exist_ok=True)
            subprocess.run(["cp", "-a", f"{tree}/.", dest], check=True)
            return
        tar = subprocess.run(["tar", "-C", tree, "--numeric-owner", "-cf", "-", "."],
                             capture_output=True, check=True).stdout
        self._ingest(repo, ["-k", "-t", "-", "-b", base_dir], tar)

    def delete(self, repo: str, rel: str) -> None:
        """Unpublish a path of the repository."""
        if repo in self.stores:
            shutil.rmtree(os.path.join(self.stores[repo], rel))
            return
        self._ingest(repo, ["-d", rel], b"")

    def _ingest(self, repo: str, args: List[str], data: bytes) -> None:
        r = subprocess.run(["cvmfs_server", "ingest", *args, repo], input=data,
                           capture_output=True, timeout=600, cwd="/")
        if r.returncode != 0:
            raise RuntimeError(f"cvmfs_server ingest {' '.join(args)} {repo} failed:\n"
                               f"{r.stdout.decode(errors='replace')}"
                               f"{r.stderr.decode(errors='replace')}")
        self.refresh(repo)

    def stop(self) -> None:
        for repo in self.repos + self.plain:
            mnt = os.path.join(self.root, repo)
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        if not any(os.path.ismount(os.path.join(self.root, r)) for r in self.repos + self.plain):
            shutil.rmtree(self.base, ignore_errors=True)
