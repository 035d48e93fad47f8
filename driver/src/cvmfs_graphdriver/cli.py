"""`cvmfs-graphdriver` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, List, Optional

from . import __version__, metrics
from .config import (
    DEFAULT_CONFIG_PATH,
    LOG_LEVELS,
    Config,
    ConfigError,
    load,
    parse_list,
    state_file,
    volumes_state_file,
)
from .driver import Driver
from .errors import DriverError
from .memory import limit_malloc_arenas
from .server import PluginServer
from .sockets import activated_socket, bind_socket, sd_notify
from .volumes import Volumes

log = logging.getLogger("cvmfs_graphdriver")

def _daemon_args(parser: argparse.ArgumentParser, socket_default: str) -> None:
    """--config, --socket and --log-level, which every daemon command takes."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH}, optional)")
    parser.add_argument("--socket", metavar="PATH",
                        help=f"unix socket to listen on (default {socket_default})")
    parser.add_argument("--log-level", choices=LOG_LEVELS)


def _repository_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--cvmfs-root and --repositories (the allow-list, for `what`)."""
    parser.add_argument("--cvmfs-root", metavar="DIR",
                        help="where CVMFS repositories are mounted (default /cvmfs)")
    parser.add_argument("--repositories", metavar="REPO[,REPO...]",
                        help=f"{what} (replaces the configured list)")


def _metrics_args(parser: argparse.ArgumentParser) -> None:
    """--metrics-textfile-dir, --metrics-socket and --metrics-interval (config.py)."""
    parser.add_argument("--metrics-textfile-dir", metavar="DIR",
                        help="write Prometheus metrics into DIR for node_exporter's textfile "
                        "collector ('' turns it off)")
    parser.add_argument("--metrics-socket", metavar="PATH",
                        help="serve GET /metrics on this unix socket, mode 0600 ('' turns "
                        "it off)")
    parser.add_argument("--metrics-interval", metavar="SECONDS", type=int,
                        help="seconds between two writes of the metrics file (default 15)")


def _exporter(cfg: Config, face: str, collect: Callable[[], metrics.Samples],
              socket_path: str) -> metrics.Exporter:
    """The face's metrics as configured, started (nothing runs when both are off)."""
    return metrics.exporter_for(
        face, collect, textfile_dir=cfg.metrics_textfile_dir, socket_path=socket_path,
        interval=cfg.metrics_interval, cvmfs_root=cfg.cvmfs_root,
        repositories=cfg.repositories).start()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cvmfs-graphdriver",
        description="Docker graph-driver plugin: overlay2-compatible layers, thin images "
        "from CernVM-FS.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the plugin protocol (what systemd runs)")
    _daemon_args(s, "/run/docker/plugins/cvmfs.sock")
    sync = s.add_mutually_exclusive_group()
    sync.add_argument("--sync-layers", dest="sync_layers", action="store_true", default=None,
                      help="flush each applied layer to disk before reporting it (default)")
    sync.add_argument("--no-sync-layers", dest="sync_layers", action="store_false",
                      help="do not flush applied layers (faster, unsafe on power loss)")
    _repository_args(s, "repositories thin images may use")
    vol = s.add_mutually_exclusive_group()
    vol.add_argument("--volumes", dest="volumes", action="store_true", default=None,
                     help="also serve allowed repositories as read-only Docker volumes "
                     "(VolumeDriver; the default)")
    vol.add_argument("--no-volumes", dest="volumes", action="store_false",
                     help="serve the graph driver only")
    _metrics_args(s)
    v = sub.add_parser("volumes", help="serve only the VolumeDriver protocol: allowed "
                       "repositories as read-only Docker volumes (for snapshotter mode)")
    _daemon_args(v, "/run/docker/plugins/cvmfs.sock")
    _repository_args(v, "repositories that are volumes")
    show = sub.add_parser("show-config", help="print the effective configuration")
    show.add_argument("--config", metavar="FILE", help="configuration file to read")
    _snapshotter_parser(sub)
    _node_parsers(sub)
    return p


def _node_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`check` and `status` (modules check and status; they import this one)."""
    from . import check, status

    c = sub.add_parser("check", help="preflight of this node: overlayfs, sockets, the "
                       "engine, repositories, free space (exit 1 on a failure)")
    check.add_arguments(c)
    c.set_defaults(run=check.command)
    st = sub.add_parser("status", help="layers (regular, thin, lazy), thin layers per "
                        "repository, active mounts, disk used")
    status.add_arguments(st)
    st.set_defaults(run=status.command)


def serve(args: argparse.Namespace, graph: bool = True) -> int:
    """`serve` (the graph driver, and volumes when configured) or `volumes` (graph=False:
    volumes only)."""
    cfg = load(args.config).replace(
        socket=args.socket, log_level=args.log_level,
        sync_layers=getattr(args, "sync_layers", None), cvmfs_root=args.cvmfs_root,
        repositories=None if args.repositories is None else parse_list(args.repositories),
        volumes=getattr(args, "volumes", None),
        metrics_textfile_dir=getattr(args, "metrics_textfile_dir", None),
        metrics_socket=getattr(args, "metrics_socket", None),
        metrics_interval=getattr(args, "metrics_interval", None),
    )
    if not graph and not cfg.volumes:
        raise ConfigError("`volumes` serves the VolumeDriver protocol, which the "
                          "configuration turns off (volumes = false)")
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas()
    sock = activated_socket()
    bound_path = None
    if sock is None:
        sock = bind_socket(cfg.socket)
        bound_path = cfg.socket
    driver = None
    if graph:
        driver = Driver(cfg, state_file=state_file(cfg.socket))
        driver.restore()
    volumes = None
    if cfg.volumes:
        volumes = Volumes(cfg.cvmfs_root, cfg.repositories, volumes_state_file(cfg.socket))
    server = PluginServer(sock, driver, volumes)
    exporter = None

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (mounts stay: running containers keep their layers)",
                 signum)
        sd_notify("STOPPING=1")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if driver is not None:  # before READY: a metrics socket in use stops the start
            exporter = _exporter(cfg, metrics.FACE_GRAPHDRIVER, driver.metric_samples,
                                 cfg.metrics_socket)
        log.info("cvmfs-graphdriver %s (%s) listening on %s", __version__,
                 " + ".join(server.faces),
                 bound_path or f"socket from systemd (fd {sock.fileno()})")
        sd_notify(f"READY=1\nSTATUS=listening on {bound_path or 'activated socket'}")
        server.serve_forever(poll_interval=0.5)
    finally:
        if exporter is not None:
            exporter.stop()
        server.server_close()
        if bound_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound_path)
    return 0


# ---------------------------------------------------------------------------- snapshotter
# The containerd snapshotter face (package .snapshotter). It needs grpcio and protobuf,
# so it is imported only here, when the command runs: `serve` stays standard-library only.

SNAPSHOTTER_DEPS_HINT = (
    "the snapshotter needs the Python packages grpcio and protobuf: "
    "pip install 'cvmfs-graphdriver[snapshotter]' "
    "(or on Debian 12: apt-get install python3-grpcio python3-protobuf)"
)


def _snapshotter_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("snapshotter",
                       help="serve containerd's Snapshots API (a containerd proxy plugin)")
    _daemon_args(s, "/run/cvmfs-graphdriver/snapshotter.sock")
    s.add_argument("--home", metavar="DIR",
                   help="where snapshots live (default /var/lib/cvmfs-graphdriver/snapshotter)")
    _repository_args(s, "repositories remote layers may come from")
    _metrics_args(s)


def snapshotter(args: argparse.Namespace) -> int:
    cfg = load(args.config).replace(
        snapshotter_socket=args.socket,
        snapshotter_home=None if args.home is None else os.path.abspath(args.home),
        log_level=args.log_level, cvmfs_root=args.cvmfs_root,
        repositories=None if args.repositories is None else parse_list(args.repositories),
        metrics_textfile_dir=args.metrics_textfile_dir,
        snapshotter_metrics_socket=args.metrics_socket, metrics_interval=args.metrics_interval,
    )
    try:
        from .snapshotter import service
    except ImportError as e:
        print(f"cvmfs-graphdriver: {SNAPSHOTTER_DEPS_HINT} ({e})", file=sys.stderr)
        return 2
    from .snapshotter.errdefs import SnapshotterError
    from .snapshotter.metastore import MetaStoreError

    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas()
    from .snapshotter import remote

    exporters: List[metrics.Exporter] = []

    def setup(sn: Any) -> object:
        cv = remote.install(sn, cfg.cvmfs_root, cfg.repositories,
                            cfg.snapshotter_trust_unrecorded_layers)
        exporters.append(_exporter(cfg, metrics.FACE_SNAPSHOTTER,
                                   lambda: remote.metric_samples(sn, cv),
                                   cfg.snapshotter_metrics_socket))
        return cv

    try:
        return service.run(cfg.snapshotter_home, cfg.snapshotter_socket,
                           sync_commits=cfg.sync_layers, setup=setup)
    except (SnapshotterError, MetaStoreError) as e:
        print(f"cvmfs-graphdriver: {e}", file=sys.stderr)
        return 2
    finally:
        for exporter in exporters:
            exporter.stop(final_write=False)  # the snapshots' store is closed by now


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "volumes":
            return serve(args, graph=False)
        if args.command == "snapshotter":
            return snapshotter(args)
        if args.command in ("check", "status"):
            return int(args.run(args))
        if args.command == "show-config":
            cfg = load(args.config)
            for key, value in vars(cfg).items():
                if isinstance(value, bool):
                    value = str(value).lower()
                elif isinstance(value, tuple):
                    value = ", ".join(value)
                print(f"{key} = {value}")
            return 0
    except (ConfigError, DriverError) as e:
        print(f"cvmfs-graphdriver: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
