"""Metrics in Prometheus' text exposition format (version 0.0.4), standard library only.

Both faces export what applies to them, to node_exporter's textfile collector (a file
`<metrics_textfile_dir>/<face file>`, replaced atomically every `metrics_interval`
seconds) and, optionally, on a root-only unix socket answering `GET /metrics`.

- Counters (ApplyDiff, errors, lazy pulls) are module-level objects that the code
  increments where the event happens: one lock-protected addition, nothing else.
- Gauges (layer counts, mounts, repository availability) are read from the face's
  state by a `collect` function when an exposition is rendered, in the metrics thread
  or the socket's handler, never in a request path of the driver.

Every sample carries the label `face` ("graphdriver" or "snapshotter"): node_exporter
merges the files of its textfile directory, and the two faces' files must not give the
same series twice. Names, help and types live in FAMILIES only.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import math
import os
import socketserver
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterable, List, Optional, Tuple

from . import __version__

log = logging.getLogger(__name__)

PREFIX = "cvmfs_graphdriver_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FACE_GRAPHDRIVER = "graphdriver"
FACE_SNAPSHOTTER = "snapshotter"
# The file each face writes into the textfile directory (node_exporter reads *.prom).
TEXTFILE_NAMES = {FACE_GRAPHDRIVER: "cvmfs_graphdriver.prom",
                  FACE_SNAPSHOTTER: "cvmfs_graphdriver_snapshotter.prom"}
PROBE_SECONDS = 5.0  # how long a repository may take to answer the availability probe
SOCKET_TIMEOUT = 10.0  # a client of the metrics socket that sends nothing is dropped

LabelValues = Tuple[str, ...]
Samples = Dict[str, Dict[LabelValues, float]]  # family name -> label values -> value


@dataclass(frozen=True)
class Family:
    name: str  # without PREFIX
    type: str  # "counter" or "gauge"
    help: str
    labels: Tuple[str, ...] = ()

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


# Every metric either face exports, in exposition order.
BUILD_INFO = Family("build_info", "gauge", "The daemon's version (always 1).", ("version",))
LAYERS = Family(
    "layers", "gauge",
    "Layers in the store by kind: regular (unpacked on this node), thin (a thin image's "
    "layer, its files in CVMFS), lazy (a registry layer served from CVMFS, snapshotter).",
    ("kind",))
APPLYDIFF = Family("applydiff_total", "counter", "Layers unpacked by ApplyDiff.")
APPLYDIFF_BYTES = Family("applydiff_bytes_total", "counter",
                         "Bytes of the layers unpacked by ApplyDiff (their files' sizes).")
APPLYDIFF_SECONDS = Family("applydiff_seconds_total", "counter",
                           "Seconds spent in ApplyDiff (unpacking, measuring, flushing).")
MOUNTED_LAYERS = Family("mounted_layers", "gauge",
                        "Layers mounted (graph driver) or active snapshots (snapshotter): "
                        "containers' roots and layers being built or committed.")
REPOSITORY_MOUNTS = Family(
    "repository_mounts", "gauge",
    "Mounted layers or active snapshots standing on layers from this CVMFS repository.",
    ("repository",))
DESCRIPTOR_ERRORS = Family(
    "descriptor_errors_total", "counter",
    "Thin image descriptors (thin.json) or remote layer records refused as unusable.")
MOUNT_ERRORS = Family(
    "mount_errors_total", "counter",
    "Mounts that failed (overlay mount refused, CVMFS layers missing or unreadable).")
REPOSITORY_AVAILABLE = Family(
    "repository_available", "gauge",
    f"Whether an allowed CVMFS repository answered a look at its root within "
    f"{PROBE_SECONDS:g} s (1) or not (0).", ("repository",))
LAZY_LAYERS = Family(
    "lazy_layers_total", "counter",
    "Layers containerd asked for with their registry digest (lazy pulls): served from "
    "CVMFS, or left to containerd to download.", ("outcome",))

FAMILIES = (BUILD_INFO, LAYERS, APPLYDIFF, APPLYDIFF_BYTES, APPLYDIFF_SECONDS,
            MOUNTED_LAYERS, REPOSITORY_MOUNTS, DESCRIPTOR_ERRORS, MOUNT_ERRORS,
            REPOSITORY_AVAILABLE, LAZY_LAYERS)
# What each face exports (the others do not apply to it).
FACE_FAMILIES = {
    FACE_GRAPHDRIVER: (BUILD_INFO, LAYERS, APPLYDIFF, APPLYDIFF_BYTES, APPLYDIFF_SECONDS,
                       MOUNTED_LAYERS, REPOSITORY_MOUNTS, DESCRIPTOR_ERRORS, MOUNT_ERRORS,
                       REPOSITORY_AVAILABLE),
    FACE_SNAPSHOTTER: (BUILD_INFO, LAYERS, MOUNTED_LAYERS, REPOSITORY_MOUNTS,
                       DESCRIPTOR_ERRORS, MOUNT_ERRORS, REPOSITORY_AVAILABLE, LAZY_LAYERS),
}


class Counter:
    """A counter with fixed label names; `inc` is all the instrumented code calls."""

    def __init__(self, family: Family, initial: Iterable[LabelValues] = ()) -> None:
        assert family.type == "counter"
        self.family = family
        self._lock = threading.Lock()
        self._values: Dict[LabelValues, float] = {v: 0.0 for v in initial}
        if not family.labels:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def values(self) -> Dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)


applydiff = Counter(APPLYDIFF)
applydiff_bytes = Counter(APPLYDIFF_BYTES)
applydiff_seconds = Counter(APPLYDIFF_SECONDS)
descriptor_errors = Counter(DESCRIPTOR_ERRORS)
mount_errors = Counter(MOUNT_ERRORS)
LAZY_SERVED, LAZY_DOWNLOADED = "served", "downloaded"
lazy_layers = Counter(LAZY_LAYERS, initial=[(LAZY_SERVED,), (LAZY_DOWNLOADED,)])
COUNTERS = {c.family.name: c for c in (applydiff, applydiff_bytes, applydiff_seconds,
                                       descriptor_errors, mount_errors, lazy_layers)}


def applied(size: int, seconds: float) -> None:
    """One layer unpacked by ApplyDiff."""
    applydiff.inc()
    applydiff_bytes.inc(size)
    applydiff_seconds.inc(seconds)


# ---------------------------------------------------------------------------- format


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(face: str, gauges: Samples) -> str:
    """The exposition of `face`: its counters as they are now, and `gauges` (family name
    -> label values -> value, from its collect function). Every sample gets `face`."""
    lines: List[str] = []
    for family in FACE_FAMILIES[face]:
        if family.type == "counter":
            samples = COUNTERS[family.name].values()
        elif family is BUILD_INFO:
            samples = {(__version__,): 1.0}
        else:
            samples = gauges.get(family.name, {})
        lines.append(f"# HELP {family.full_name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.full_name} {family.type}")
        for values, value in sorted(samples.items()):
            pairs = [("face", face), *zip(family.labels, values)]
            labels = ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs)
            lines.append(f"{family.full_name}{{{labels}}} {format_value(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- repositories


class RepositoryProbe:
    """Whether each allowed repository answers a look at its root (a stat and the first
    entry of its listing: what autofs needs to mount it, what a hung mount never
    answers). Probed by the metrics thread; a probe still hanging from an earlier round
    counts as unavailable and is not started again (one stuck thread per repository at
    most, never more)."""

    def __init__(self, cvmfs_root: str, repositories: Collection[str],
                 timeout: float = PROBE_SECONDS) -> None:
        self.cvmfs_root = cvmfs_root
        self.repositories = tuple(sorted(repositories))
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pending: Dict[str, threading.Thread] = {}
        self._results: Dict[str, bool] = {}  # written by the probe threads
        self._available: Dict[str, bool] = {}

    def _look(self, repo: str) -> None:
        ok = False
        try:
            path = os.path.join(self.cvmfs_root, repo)
            if stat.S_ISDIR(os.stat(path).st_mode):
                with os.scandir(path) as it:
                    next(it, None)
                ok = True
        except OSError:
            pass
        with self._lock:
            self._results[repo] = ok

    def refresh(self) -> None:
        started = []
        for repo in self.repositories:
            pending = self._pending.get(repo)
            if pending is not None and pending.is_alive():
                continue
            t = threading.Thread(target=self._look, args=(repo,), daemon=True,
                                 name=f"metrics-probe-{repo}")
            with self._lock:
                self._results.pop(repo, None)
            t.start()
            self._pending[repo] = t
            started.append(t)
        deadline = time.monotonic() + self.timeout
        for t in started:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._available = {repo: self._results.get(repo, False)
                               for repo in self.repositories}

    def samples(self) -> Dict[LabelValues, float]:
        with self._lock:
            return {(repo,): float(self._available.get(repo, False))
                    for repo in self.repositories}


# ---------------------------------------------------------------------------- exporter


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _MetricsServer
    timeout = SOCKET_TIMEOUT
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = self.server.exporter.render().encode()
        except Exception as e:  # a collect that failed: say so, keep serving
            log.exception("rendering the metrics failed")
            self.send_error(500, f"rendering the metrics failed: {type(e).__name__}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("metrics socket: " + format, *args)


class _MetricsServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, exporter: Exporter, path: str) -> None:
        from .sockets import bind_socket  # mode 0600, a stale socket replaced, a live one kept

        super().__init__("", _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = bind_socket(path)
        self.server_address = path
        self.exporter = exporter


class Exporter:
    """Renders `face`'s metrics; writes them to the textfile directory every `interval`
    seconds and serves them on `socket_path` (either may be empty: off). The thread
    also refreshes the repository probe. Failures to write are logged once (until a
    write succeeds again) and never stop the daemon."""

    def __init__(self, face: str, collect: Callable[[], Samples], *, textfile_dir: str = "",
                 socket_path: str = "", interval: float = 15.0,
                 probe: Optional[RepositoryProbe] = None) -> None:
        self.face = face
        self.collect = collect
        self.textfile = os.path.join(textfile_dir, TEXTFILE_NAMES[face]) if textfile_dir \
            else ""
        self.socket_path = socket_path
        self.interval = interval
        self.probe = probe
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[_MetricsServer] = None
        self._server_thread: Optional[threading.Thread] = None
        self._write_failing = False

    @property
    def enabled(self) -> bool:
        return bool(self.textfile or self.socket_path)

    def render(self) -> str:
        gauges = dict(self.collect())
        if self.probe is not None:
            gauges[REPOSITORY_AVAILABLE.name] = self.probe.samples()
        return render(self.face, gauges)

    def start(self) -> Exporter:
        """Bind the socket (errors: DriverError, the daemon does not start) and start
        the threads. Nothing happens when neither output is configured."""
        if not self.enabled:
            return self
        if self.socket_path:
            self._server = _MetricsServer(self, self.socket_path)
            self._server_thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                daemon=True, name="metrics-socket")
            self._server_thread.start()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics")
        self._thread.start()
        log.info("metrics (%s): %s", self.face, ", ".join(filter(None, [
            self.textfile and f"written to {self.textfile} every {self.interval:g} s",
            self.socket_path and f"served on {self.socket_path} (GET /metrics)"])))
        return self

    def _run(self) -> None:
        while True:
            self.update()
            if self._stop.wait(self.interval):
                return

    def update(self) -> None:
        """Probe the repositories and write the textfile (one round of the thread)."""
        try:
            if self.probe is not None:
                self.probe.refresh()
            if self.textfile:
                self.write_textfile()
        except Exception:  # the metrics must never take the daemon down
            log.exception("metrics (%s): updating them failed", self.face)

    def write_textfile(self) -> None:
        directory, name = os.path.split(self.textfile)
        # Not *.prom: node_exporter must never read a half-written file.
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        try:
            text = self.render()
        except Exception:  # a collect that failed: the last file stays
            log.exception("metrics (%s): rendering them failed", self.face)
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                os.fchmod(fd, 0o644)  # node_exporter runs as its own user: it must read it
                with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
                    f.write(text)
            finally:
                os.close(fd)
            os.replace(tmp, self.textfile)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._write_failing:
                log.warning("metrics: cannot write %s: %s; the driver carries on without it "
                            "(check that the directory exists and is writable; this is "
                            "logged once until a write succeeds)", self.textfile, e)
            self._write_failing = True
            return
        if self._write_failing:
            log.info("metrics: %s written again", self.textfile)
        self._write_failing = False

    def stop(self, final_write: bool = True) -> None:
        """Stop the threads, write the textfile a last time (unless the face's state is
        already closed: `final_write` False), remove the socket."""
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PROBE_SECONDS + 5)
        if self.textfile and final_write:
            self.write_textfile()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def exporter_for(face: str, collect: Callable[[], Samples], *, textfile_dir: str,
                 socket_path: str, interval: float, cvmfs_root: str,
                 repositories: Collection[str]) -> Exporter:
    return Exporter(face, collect, textfile_dir=textfile_dir, socket_path=socket_path,
                    interval=interval,
                    probe=RepositoryProbe(cvmfs_root, repositories) if repositories else None)

