"""`cvmfs-graphdriver check`: the preflight of a worker node.

Each check gives one Result: ok, warn (works, but look), fail (the fix says what to run
or change) or "not configured" (the configuration turns the thing off, said so rather
than passed over). A check that cannot even look (no engine, no socket, no home) fails
naming why; none raises. The CLI exits 1 when any check failed.

    config            the configuration file loads; which face it configures
    plugin socket     answers Plugin.Activate with the faces the configuration asks for
    snapshotter socket  (snapshotter mode) answers HTTP/2, as gRPC servers do
    home              the store's home: Init's (recorded by the plugin daemon) or [snapshotter] home
    overlay           overlayfs in the kernel, the home not on overlayfs, d_type, an overlay
                      mounts there (with `userxattr` where the kernel needs it)
    engine            `docker info`: version, storage driver and face as configured
    engine config     daemon.json says the same (so a restart keeps it)
    repository REPO   each allowed repository lists, and the layers the node's thin and
                      lazy layers use in it (or, with none, its .layers) are readable
    free space        bytes and inodes free on the home's filesystem

Everything the checks touch comes in through `Node` (paths, commands, timeouts), so
tests run them without a full node.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

from . import mounts, thin
from .config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    configured_mode,
    load,
    parse_size,
    state_file,
)
from .errors import DriverError
from .status import (
    StatusError,
    StoreStatus,
    find_home,
    node_arguments,
    plugin_status,
    snapshotter_status,
)

OK, WARN, FAIL, NOT_CONFIGURED = "ok", "warn", "fail", "not configured"

# The Docker versions each face works with (the docker_engine role's vars/main.yml holds
# the same two numbers; tests/unit/test_check.py keeps them equal).
PLUGIN_MAX_MAJOR = 27  # Docker 28 removed graph-driver plugins
SNAPSHOTTER_MIN_MAJOR = 24  # the containerd image store came with Docker 24
SNAPSHOTTER_DRIVER_TYPE = ["driver-type", "io.containerd.snapshotter.v1"]  # docker info

DEFAULT_DAEMON_JSON = "/etc/docker/daemon.json"
DEFAULT_MIN_FREE = 2 << 30
MIN_FREE_INODES = 0.02  # of the filesystem's inodes
JOURNAL = "journalctl -u docker -u containerd -u 'cvmfs-graphdriver*'"

_T = TypeVar("_T")


@dataclass
class Result:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Node:
    """What the checks read, each replaceable for a test."""

    config_path: Optional[str] = None  # None: the default path (a missing file: defaults)
    mode: str = "auto"  # plugin | snapshotter | auto (the configuration's [snapshotter])
    storage_driver: str = ""  # "": the plugin socket's name (cvmfs.sock -> cvmfs)
    docker: Sequence[str] = ("docker",)  # the engine's CLI (DOCKER_HOST applies)
    daemon_json: str = DEFAULT_DAEMON_JSON  # "": do not look
    proc_filesystems: str = "/proc/filesystems"
    uid_map: str = "/proc/self/uid_map"
    min_free: int = DEFAULT_MIN_FREE
    timeout: float = 10.0
    state_file: Callable[[str], str] = state_file


@dataclass
class Report:
    mode: str
    results: List[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != FAIL for r in self.results)

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Result:
        r = Result(name, status, detail, fix)
        self.results.append(r)
        return r

    def to_json(self) -> Dict[str, Any]:
        return {"ok": self.ok, "mode": self.mode,
                "failed": [r.name for r in self.results if r.status == FAIL],
                "checks": [asdict(r) for r in self.results]}


def within(seconds: float, action: Callable[[], _T]) -> _T:
    """`action`'s result, or TimeoutError when it has not returned within `seconds` (a
    CVMFS mount that does not answer blocks a stat in the kernel; the thread is left
    behind, the command ends anyway)."""
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = action()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- config


def driver_name(socket_path: str) -> str:
    """The storage driver name dockerd finds a plugin by: its socket's name."""
    name = os.path.basename(socket_path)
    return name[:-len(".sock")] if name.endswith(".sock") else name


# ---------------------------------------------------------------------------- sockets


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("plugin", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def plugin_activate(path: str, timeout: float) -> List[str]:
    """What the plugin on `path` implements (the handshake dockerd starts with)."""
    conn = _UnixHTTP(path, timeout)
    try:
        conn.request("POST", "/Plugin.Activate", body=b"",
                     headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = conn.getresponse()
        body = resp.read(1 << 16)
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"Plugin.Activate answered HTTP {resp.status}")
    try:
        faces = json.loads(body)["Implements"]
    except (ValueError, KeyError, TypeError):
        raise OSError(f"Plugin.Activate answered {body[:200]!r}, not a plugin's "
                      "handshake") from None
    if not isinstance(faces, list):
        raise OSError(f"Plugin.Activate answered Implements={faces!r}")
    return [str(f) for f in faces]


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = 0x4


def http2_answers(path: str, timeout: float) -> None:
    """Whether an HTTP/2 server (gRPC's transport) answers on `path`: after the client
    preface and an empty SETTINGS frame, a server's first frame is its SETTINGS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        head = b""
        while len(head) < 9:
            chunk = s.recv(9 - len(head))
            if not chunk:
                raise OSError("closed the connection without an HTTP/2 answer")
            head += chunk
    if head[3] != H2_SETTINGS:
        raise OSError(f"answered {head!r}, not an HTTP/2 SETTINGS frame")


def _socket_failure(path: str, e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return f"{path} does not exist"
    if isinstance(e, ConnectionRefusedError):
        return f"{path}: nothing listens (connection refused)"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"{path}: connected, but no answer in time"
    return f"{path}: {e}"


def check_plugin_socket(node: Node, cfg: Config, mode: str, report: Report) -> None:
    want = (["GraphDriver"] if mode == "plugin" else []) + (["VolumeDriver"] if cfg.volumes
                                                            else [])
    name = "plugin socket"
    if not want:
        report.add(name, NOT_CONFIGURED, "snapshotter mode with volumes = false: nothing "
                   "serves the plugin socket")
        return
    unit = "cvmfs-graphdriver" if mode == "plugin" else "cvmfs-graphdriver-volumes"
    fix = (f"systemctl restart {unit}.socket {unit}.service, and see journalctl -u {unit}; "
           "the graphdriver role (site.yml) installs both units")
    try:
        faces = plugin_activate(cfg.socket, node.timeout)
    except (OSError, http.client.HTTPException) as e:
        report.add(name, FAIL, _socket_failure(cfg.socket, e), fix)
        return
    missing = [f for f in want if f not in faces]
    if missing:
        report.add(name, FAIL, f"{cfg.socket} implements {', '.join(faces) or 'nothing'}, "
                   f"not {', '.join(missing)}", f"the configuration asks for "
                   f"{', '.join(want)}: restart {unit}.service so it reads "
                   f"{node.config_path or 'the configuration'} again")
        return
    report.add(name, OK, f"{cfg.socket} answers: {', '.join(faces)}")


def check_snapshotter_socket(node: Node, cfg: Config, mode: str, report: Report) -> None:
    name = "snapshotter socket"
    if mode != "snapshotter":
        report.add(name, NOT_CONFIGURED, "plugin mode (no [snapshotter] section)")
        return
    try:
        http2_answers(cfg.snapshotter_socket, node.timeout)
    except OSError as e:
        report.add(name, FAIL, _socket_failure(cfg.snapshotter_socket, e),
                   "systemctl restart cvmfs-graphdriver-snapshotter.socket "
                   "cvmfs-graphdriver-snapshotter.service, and see journalctl -u "
                   "cvmfs-graphdriver-snapshotter")
        return
    report.add(name, OK, f"{cfg.snapshotter_socket} answers (HTTP/2, gRPC's transport)")


# ---------------------------------------------------------------------------- home


def check_overlay(node: Node, home: str, mode: str, report: Report) -> None:
    name = "overlay"
    try:
        with open(node.proc_filesystems, encoding="utf-8") as f:
            known = {line.split()[-1] for line in f if line.strip()}
    except OSError as e:
        report.add(name, FAIL, f"cannot read {node.proc_filesystems}: {e.strerror}",
                   "run the check on the node itself, as root")
        return
    if "overlay" not in known:
        report.add(name, FAIL, "the kernel has no overlayfs (not in /proc/filesystems)",
                   "modprobe overlay and persist it (the overlay role in site.yml does)")
        return
    try:
        fs = mounts.fs_name(home)
        on_overlay = mounts.fs_magic(home) == mounts.OVERLAY_MAGIC
    except OSError as e:
        report.add(name, FAIL, f"cannot statfs {home}: {e}", "run the check as root")
        return
    if on_overlay:
        report.add(name, FAIL, f"{home} is on overlayfs, which cannot hold overlay upper "
                   "directories", "put the home (Docker's data-root, or [snapshotter] home) "
                   "on ext4, xfs or a volume")
        return
    from .snapshotter.mountspec import running_in_userns

    userns = running_in_userns(node.uid_map)
    if userns and mode == "plugin":
        report.add(name, FAIL, "this runs in a user namespace, where overlay needs "
                   "`userxattr`, which the graph-driver plugin does not pass",
                   "run Docker and the driver in the host's user namespace, or use "
                   "snapshotter mode (docker_engine_mode: snapshotter), which does")
        return
    try:
        with tempfile.TemporaryDirectory(prefix=".check-", dir=home) as td:
            d_type = mounts.supports_d_type(td)
            userxattr = False
            if d_type:
                if mode == "snapshotter":
                    from .snapshotter.mountspec import needs_userxattr

                    userxattr = needs_userxattr(td)
                _trial_mount(td, userxattr)
    except (OSError, DriverError) as e:
        report.add(name, FAIL, f"cannot mount overlayfs in {home} ({fs}): {e}",
                   "check dmesg for overlayfs errors; the home must be on a local "
                   "filesystem (ext4, xfs with ftype=1) and the check must run as root")
        return
    if not d_type:
        report.add(name, FAIL, f"{home} ({fs}) does not support d_type, which overlayfs "
                   "needs", "put the home on ext4, or on xfs formatted with ftype=1")
        return
    report.add(name, OK, f"{home} on {fs}: d_type, an overlay mounts" +
               (" (with userxattr: user namespace)" if userxattr else ""))


def _trial_mount(td: str, userxattr: bool) -> None:
    for d in ("lower", "upper", "work", "merged"):
        os.mkdir(os.path.join(td, d), 0o755)
    with open(os.path.join(td, "lower", "f"), "w") as f:
        f.write("x")
    data = f"lowerdir={td}/lower,upperdir={td}/upper,workdir={td}/work" + (
        ",userxattr" if userxattr else "")
    merged = os.path.join(td, "merged")
    mounts.mount_overlay(data, merged)
    try:
        with open(os.path.join(merged, "f"), "a") as f:
            f.write("y")  # a copy-up
    finally:
        mounts.unmount(merged)


def check_free_space(node: Node, home: str, report: Report) -> None:
    from .status import human_bytes

    try:
        vfs = os.statvfs(home)
    except OSError as e:
        report.add("free space", FAIL, f"cannot statvfs {home}: {e.strerror or e}",
                   "run the check on the node itself, as root")
        return
    free = vfs.f_bavail * vfs.f_frsize
    inodes = vfs.f_favail / vfs.f_files if vfs.f_files else 1.0
    detail = (f"{human_bytes(free)} free of {human_bytes(vfs.f_blocks * vfs.f_frsize)}, "
              f"{inodes:.0%} of inodes free on {home}'s filesystem")
    if free < node.min_free:
        report.add("free space", FAIL, f"{detail}: less than {human_bytes(node.min_free)}",
                   "remove unused images (docker image prune -a) or grow the filesystem")
    elif inodes < MIN_FREE_INODES:
        report.add("free space", FAIL, f"{detail}: inodes nearly used up",
                   "remove unused images (docker image prune -a), or recreate the "
                   "filesystem with more inodes")
    else:
        report.add("free space", OK, detail)


# ---------------------------------------------------------------------------- engine


def docker_info(node: Node) -> Dict[str, Any]:
    try:
        r = subprocess.run([*node.docker, "info", "--format", "{{json .}}"],
                           capture_output=True, text=True, timeout=node.timeout,
                           stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise OSError(f"{node.docker[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise OSError(f"`docker info` did not answer in {node.timeout:g} s") from None
    if r.returncode != 0:
        raise OSError(f"`docker info` failed: {(r.stderr or r.stdout).strip()[:400]}")
    try:
        info = json.loads(r.stdout)
    except ValueError:
        raise OSError(f"`docker info` printed no JSON: {r.stdout[:200]!r}") from None
    if not isinstance(info, dict):
        raise OSError("`docker info` printed no JSON object")
    if not info.get("ServerVersion"):  # the client prints ServerErrors, no server part
        raise OSError("Docker's daemon does not answer: "
                      + "; ".join(map(str, info.get("ServerErrors") or ["no server version"])))
    return info


def major_version(version: str) -> Optional[int]:
    m = re.match(r"(\d+)\.", version)
    return int(m.group(1)) if m else None


def check_engine(node: Node, cfg: Config, mode: str, expected: str, report: Report) -> None:
    name = "engine"
    try:
        info = docker_info(node)
    except OSError as e:
        report.add(name, FAIL, str(e), "install and start Docker (site.yml's docker_engine "
                   f"role; systemctl start docker), and see {JOURNAL}")
        return
    version = str(info.get("ServerVersion"))
    major = major_version(version)
    driver = info.get("Driver")
    status = info.get("DriverStatus") or []
    on_snapshotter = SNAPSHOTTER_DRIVER_TYPE in status
    face = "containerd snapshotter" if on_snapshotter else "graph-driver plugin"
    problems, fixes = [], []
    if major is not None and mode == "plugin" and major > PLUGIN_MAX_MAJOR:
        problems.append(f"Docker {version} has no graph-driver plugins (removed in "
                        f"{PLUGIN_MAX_MAJOR + 1})")
        fixes.append("switch the node to snapshotter mode (docker_engine_mode: snapshotter) "
                     f"or install Docker {PLUGIN_MAX_MAJOR} or older")
    if major is not None and mode == "snapshotter" and major < SNAPSHOTTER_MIN_MAJOR:
        problems.append(f"Docker {version} has no containerd image store (it came with "
                        f"{SNAPSHOTTER_MIN_MAJOR})")
        fixes.append(f"install Docker {SNAPSHOTTER_MIN_MAJOR} or newer, or use plugin mode")
    if driver != expected or on_snapshotter != (mode == "snapshotter"):
        problems.append(f"Docker runs storage driver {driver!r} as a {face}, not "
                        f"{expected!r} as a "
                        + ("containerd snapshotter" if mode == "snapshotter"
                           else "graph-driver plugin"))
        fixes.append("run site.yml (the docker_engine role sets "
                     f"{node.daemon_json or 'daemon.json'} and restarts Docker), or fix its "
                     "storage-driver and features, then "
                     f"systemctl restart docker; see {JOURNAL}")
    if problems:
        report.add(name, FAIL, f"Docker {version}: " + "; ".join(problems), "; ".join(fixes))
        return
    report.add(name, OK, f"Docker {version}, storage driver {driver} ({face})")


def check_engine_config(node: Node, mode: str, expected: str, report: Report) -> None:
    """daemon.json: what Docker is told at its next start."""
    name = "engine config"
    if not node.daemon_json:
        report.add(name, NOT_CONFIGURED, "no daemon.json given (--daemon-json '')")
        return
    try:
        with open(node.daemon_json, encoding="utf-8") as f:
            conf = json.load(f)
    except FileNotFoundError:
        report.add(name, WARN, f"{node.daemon_json} does not exist: Docker's settings come "
                   "from its command line, which this cannot see",
                   "run site.yml to write it (the docker_engine role)")
        return
    except (OSError, ValueError) as e:
        report.add(name, FAIL, f"cannot read {node.daemon_json}: {e}",
                   f"fix {node.daemon_json} (it must be a JSON object), then "
                   "systemctl restart docker")
        return
    if not isinstance(conf, dict):
        report.add(name, FAIL, f"{node.daemon_json} is not a JSON object",
                   f"fix {node.daemon_json}, then systemctl restart docker")
        return
    wrong = []
    if conf.get("storage-driver") != expected:
        wrong.append(f'"storage-driver" is {conf.get("storage-driver")!r}, not {expected!r}')
    features = conf.get("features")
    snap = isinstance(features, dict) and features.get("containerd-snapshotter") is True
    if snap != (mode == "snapshotter"):
        wrong.append(f'"features": {{"containerd-snapshotter": {str(snap).lower()}}} in '
                     f"{mode} mode")
    if mode == "plugin" and conf.get("experimental") is not True:
        wrong.append('"experimental" is not true (graph-driver plugins need it)')
    if wrong:
        report.add(name, FAIL, f"{node.daemon_json}: " + "; ".join(wrong),
                   "run site.yml (the docker_engine role writes these keys), or set them "
                   "and systemctl restart docker")
        return
    report.add(name, OK, f"{node.daemon_json}: storage-driver {expected}, {mode} mode")


# ---------------------------------------------------------------------------- CVMFS


def _list(path: str) -> List[str]:
    with os.scandir(path) as it:
        return [e.name for e in it]


def _read_layer(cvmfs_root: str, repo: str, rel: str) -> None:
    """What a mount does first: the daemon's own thin.resolve_layer_dir (which refuses a
    layer resolving outside its repository), then a listing of the directory found."""
    _list(thin.resolve_layer_dir(cvmfs_root, thin.ThinLayer(repo, rel)))


def _why(e: BaseException) -> str:
    return str(getattr(e, "strerror", None) or e)


def check_repositories(node: Node, cfg: Config, store: Optional[StoreStatus],
                       report: Report) -> None:
    """Each allowed repository within one deadline (node.timeout: a half-hung repository
    stops at its first timeout, however many layers stand on it), and each repository
    the node's layers use that is no longer allowed (the daemon refuses to mount it)."""
    used_by: Dict[str, List[str]] = {}
    for ref in store.refs if store else []:
        used_by.setdefault(ref.repo, []).append(ref.path)
    refused = sorted(set(used_by) - set(cfg.repositories))
    if not cfg.repositories and not refused:
        report.add("repositories", NOT_CONFIGURED,
                   f"no repositories allowed ({thin.CONFIG_HINT}): thin images and lazy "
                   "pulls are off")
        return
    for repo in refused:
        report.add(f"repository {repo}", FAIL,
                   f"{len(set(used_by[repo]))} layers this node's images use stand on {repo}, "
                   "which is not an allowed repository (allowed: "
                   f"{', '.join(cfg.repositories) or 'none'}): the daemon refuses to "
                   "mount them",
                   f"add {repo} to {thin.CONFIG_HINT} (graphdriver_repositories in "
                   "site.yml) and restart the daemon, or remove the images that use it")
    for repo in cfg.repositories:
        _check_repository(node, cfg, repo, sorted(set(used_by.get(repo, []))), report)


def _check_repository(node: Node, cfg: Config, repo: str, used: List[str],
                      report: Report) -> None:
    name = f"repository {repo}"
    deadline = time.monotonic() + node.timeout

    def bounded(action: Callable[[], _T]) -> _T:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {node.timeout:g} s")
        return within(left, action)

    root = os.path.join(cfg.cvmfs_root, repo)
    try:
        bounded(functools.partial(_list, root))
    except (OSError, TimeoutError) as e:
        report.add(name, FAIL, f"{root} cannot be listed: {_why(e)}",
                   f"cvmfs_config probe {repo}; check CVMFS_REPOSITORIES and "
                   "CVMFS_HTTP_PROXY in /etc/cvmfs/default.local (the cvmfs_client "
                   "role) and that the stratum 1 or proxy answers")
        return
    bad = []
    for i, rel in enumerate(used):
        try:
            bounded(functools.partial(_read_layer, cfg.cvmfs_root, repo, rel))
        except TimeoutError as e:
            bad.append(f"{rel} ({e}; the {len(used) - i - 1} after it not checked)")
            break  # the repository hangs: one deadline for all its layers
        except (OSError, DriverError) as e:
            bad.append(f"{rel} ({_why(e)})")
    if bad:
        report.add(name, FAIL, f"{len(bad)} of the {len(used)} layers this node's "
                   f"images use are not readable: " + ", ".join(bad[:5]),
                   f"republish them (cvmfs-thin) or remove the images that use them; "
                   f"cvmfs_config probe {repo}; check that cvmfs_server did not "
                   "garbage-collect them")
        return
    if used:
        report.add(name, OK, f"{root} reachable; the {len(used)} layers this node's "
                   "images use are readable")
        return
    layers_dir = os.path.join(root, thin.LAYERS_DIR)
    try:
        published = bounded(functools.partial(_list, layers_dir))
    except FileNotFoundError:
        report.add(name, OK, f"{root} reachable; no published layers ({thin.LAYERS_DIR}) "
                   "and no image on this node uses it")
        return
    except (OSError, TimeoutError) as e:
        report.add(name, FAIL, f"{layers_dir} cannot be listed: {_why(e)}",
                   f"cvmfs_config probe {repo}; check the repository's publisher")
        return
    report.add(name, OK, f"{root} reachable; {thin.LAYERS_DIR} lists "
               f"{len(published)} prefixes")


# ---------------------------------------------------------------------------- all


def run(node: Node) -> Report:
    """Every check, in order; one that cannot run says why and the rest go on."""
    try:
        cfg = load(node.config_path)
    except ConfigError as e:  # config.load words unreadable files too
        report = Report(node.mode)
        report.add("config", FAIL, str(e), "fix the configuration file (cvmfs-graphdriver "
                   "show-config --config FILE says what is wrong), or run site.yml")
        return report
    mode = configured_mode(node.config_path) if node.mode == "auto" else node.mode
    report = Report(mode)
    try:
        _run_checks(node, cfg, mode, report)
    except Exception as e:  # noqa: BLE001 - check reports, never crashes (verify.yml reads the JSON)
        report.add("check", FAIL, f"the check itself failed: {type(e).__name__}: {e}",
                   "report this as a bug of cvmfs-graphdriver check, with this output")
    return report


def _run_checks(node: Node, cfg: Config, mode: str, report: Report) -> None:
    path = node.config_path or DEFAULT_CONFIG_PATH
    absent = "" if os.path.exists(path) else " (absent: the defaults)"
    report.add("config", OK, f"{path}{absent}: {mode} mode")
    expected = node.storage_driver or driver_name(cfg.socket)
    check_plugin_socket(node, cfg, mode, report)
    check_snapshotter_socket(node, cfg, mode, report)
    home, detail, fix = find_home(cfg, mode, node.state_file)
    store = None
    if home is None:
        report.add("home", FAIL, detail, fix)
        for what in ("overlay", "free space"):
            report.add(what, FAIL, "not checked: no home", fix)
    else:
        report.add("home", OK, detail)
        check_overlay(node, home, mode, report)
        check_free_space(node, home, report)
        try:
            store = (snapshotter_status(home, disk=False) if mode == "snapshotter"
                     else plugin_status(home, disk=False))
        except (StatusError, OSError) as e:
            report.add("layers", FAIL, f"cannot read the layers: {e}",
                       "run the check as root")
        else:
            mounted = "active mounts" if mode == "plugin" else "active snapshots"
            report.add("layers", OK, f"{store.total} ({store.regular} regular, {store.thin} "
                       f"thin, {store.lazy} lazily pulled, {store.incomplete} incomplete), "
                       f"{len(store.active_mounts)} {mounted} (cvmfs-graphdriver status)")
    check_engine(node, cfg, mode, expected, report)
    check_engine_config(node, mode, expected, report)
    check_repositories(node, cfg, store, report)


MARK = {OK: "ok", WARN: "WARN", FAIL: "FAIL", NOT_CONFIGURED: "--"}


def render(report: Report) -> str:
    width = max(len(r.name) for r in report.results)
    lines = []
    for r in report.results:
        lines.append(f"[{MARK[r.status]:>4}] {r.name:<{width}}  {r.detail}")
        if r.fix and r.status in (FAIL, WARN):
            lines.append(f"{'':7}{'':<{width}}  fix: {r.fix}")
    failed = [r.name for r in report.results if r.status == FAIL]
    lines.append("")
    lines.append(f"{report.mode} mode: " + (f"{len(failed)} check(s) failed: "
                                           + ", ".join(failed) if failed else "all checks passed"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    node_arguments(p, "print the results as JSON", "the face to expect")
    p.add_argument("--storage-driver", metavar="NAME", default="",
                   help="the storage driver Docker must run (default: the plugin socket's "
                   "name, cvmfs)")
    p.add_argument("--docker", metavar="CMD", default="docker",
                   help="Docker's CLI (DOCKER_HOST applies; default docker)")
    p.add_argument("--daemon-json", metavar="FILE", default=DEFAULT_DAEMON_JSON,
                   help=f"Docker's configuration (default {DEFAULT_DAEMON_JSON}; '' skips it)")
    p.add_argument("--min-free", metavar="SIZE", default="2G",
                   help="least free space on the home's filesystem (default 2G)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=10.0,
                   help="how long a socket, Docker or a repository may take to answer")


def command(args: argparse.Namespace) -> int:
    node = Node(config_path=args.config, mode=args.mode, storage_driver=args.storage_driver,
                docker=shlex.split(args.docker), daemon_json=args.daemon_json,
                min_free=parse_size("--min-free", args.min_free), timeout=args.timeout)
    report = run(node)
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report))
    return 0 if report.ok else 1
