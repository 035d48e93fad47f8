"""The daemon's configuration: one INI file, every key with a default, flags override it.

    # /etc/cvmfs-graphdriver/config.ini
    [driver]
    # Unix socket dockerd connects to; `dockerd -s cvmfs` looks for
    # /run/docker/plugins/cvmfs.sock. Ignored under systemd socket activation.
    socket = /run/docker/plugins/cvmfs.sock
    # debug, info, warning or error (logged to stderr: journald keeps it).
    log_level = info
    # Flush each applied layer to disk before reporting it complete (safe after power loss).
    sync_layers = true
    # Most bytes one layer's files may take when it is applied (ApplyDiff), counted by
    # their sizes (a sparse file by its whole size, as the layer's Diff writes it): a
    # number of bytes, or with K, M, G or T (powers of 1024). 0: no limit of its own; a
    # layer never takes more than is free on the filesystem holding the layers.
    max_layer_bytes = 0
    # Where CVMFS repositories are mounted; thin layers cvmfs://REPO/PATH resolve to
    # <cvmfs_root>/REPO/PATH.
    cvmfs_root = /cvmfs
    # Repositories thin images may use (comma separated). Empty: thin images are refused.
    repositories =
    # Also serve Docker's VolumeDriver protocol on the socket: `docker run --mount
    # type=volume,volume-driver=cvmfs,src=REPO,dst=/cvmfs/REPO` mounts an allowed
    # repository read-only. The `volumes` command serves only this (snapshotter mode).
    volumes = true
    # Metrics in Prometheus' text format for node_exporter's textfile collector: the
    # directory it reads (--collector.textfile.directory); `serve` writes
    # cvmfs_graphdriver.prom there, `snapshotter` cvmfs_graphdriver_snapshotter.prom,
    # each replaced atomically every metrics_interval seconds. Empty: no file.
    metrics_textfile_dir =
    # A unix socket (mode 0600, root only) answering HTTP `GET /metrics` with the same
    # text, for `serve`. Empty: none.
    metrics_socket =
    # Seconds between two writes of the metrics file (and probes of the repositories).
    metrics_interval = 15

    [snapshotter]
    # The containerd snapshotter face (`cvmfs-graphdriver snapshotter`); [driver]'s
    # log_level, sync_layers, cvmfs_root and repositories apply to it too.
    # Unix socket containerd's [proxy_plugins.cvmfs] address points at.
    socket = /run/cvmfs-graphdriver/snapshotter.sock
    # Where snapshots and their metadata live (not on overlayfs).
    home = /var/lib/cvmfs-graphdriver/snapshotter
    # Lazy pulls check that a published layer is the layer containerd asks for: its
    # recorded diff ID (cvmfs-thin writes .metadata/origin.json) must give the chain ID.
    # A layer published without one (by DUCC) is then downloaded instead; true serves it
    # unchecked - only where every image a node pulls is trusted (see the README).
    trust_unrecorded_layers = false
    # The snapshotter's metrics socket ([driver]'s metrics_socket is the graph driver's).
    metrics_socket =
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

DEFAULT_CONFIG_PATH = "/etc/cvmfs-graphdriver/config.ini"
SECTION = "driver"
SNAPSHOTTER_SECTION = "snapshotter"
# [snapshotter] keys -> Config fields (kept apart from [driver]'s keys)
SNAPSHOTTER_KEYS = {"socket": "snapshotter_socket", "home": "snapshotter_home",
                    "trust_unrecorded_layers": "snapshotter_trust_unrecorded_layers",
                    "metrics_socket": "snapshotter_metrics_socket"}
# Keys whose value is a path or empty (off).
OPTIONAL_PATHS = ("metrics_textfile_dir", "metrics_socket", "snapshotter_metrics_socket")
LOG_LEVELS = ("debug", "info", "warning", "error")
SIZE_UNITS = {"K": 10, "M": 20, "G": 30, "T": 40}
SIZE_RE = re.compile(r"([0-9]+) ?([KMGTkmgt]?)(?:(?<=[KMGTkmgt])iB)?", re.ASCII)  # 50G, 50 GiB


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    socket: str = "/run/docker/plugins/cvmfs.sock"
    log_level: str = "info"
    sync_layers: bool = True
    max_layer_bytes: int = 0
    cvmfs_root: str = "/cvmfs"
    repositories: Tuple[str, ...] = ()
    volumes: bool = True
    metrics_textfile_dir: str = ""
    metrics_socket: str = ""
    metrics_interval: int = 15
    # [snapshotter] section
    snapshotter_socket: str = "/run/cvmfs-graphdriver/snapshotter.sock"
    snapshotter_home: str = "/var/lib/cvmfs-graphdriver/snapshotter"
    snapshotter_trust_unrecorded_layers: bool = False
    snapshotter_metrics_socket: str = ""

    def replace(self, **changes: Any) -> Config:
        return validate(dataclasses.replace(self, **{k: v for k, v in changes.items()
                                                      if v is not None}))


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{key} = {value!r}: expected true or false")


def parse_size(key: str, value: str) -> int:
    """A size in bytes: digits, optionally followed by K, M, G or T (powers of 1024)."""
    m = SIZE_RE.fullmatch(value.strip())
    if m is None:
        raise ConfigError(f"{key} = {value!r}: expected a number of bytes, optionally "
                          "with K, M, G or T (powers of 1024, e.g. 50G)")
    return int(m.group(1)) << SIZE_UNITS.get(m.group(2).upper(), 0)


def parse_seconds(key: str, value: str) -> int:
    if not value.strip().isdigit():
        raise ConfigError(f"{key} = {value!r}: expected a whole number of seconds")
    return int(value.strip())


def validate(cfg: Config) -> Config:
    if cfg.max_layer_bytes < 0:
        raise ConfigError(f"max_layer_bytes = {cfg.max_layer_bytes}: must be 0 (no limit of "
                          "its own) or a number of bytes")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level = {cfg.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    if not os.path.isabs(cfg.socket):
        raise ConfigError(f"socket = {cfg.socket!r}: must be an absolute path")
    for name in OPTIONAL_PATHS:
        value = getattr(cfg, name)
        if value and not os.path.isabs(value):
            key = name.replace("snapshotter_", f"[{SNAPSHOTTER_SECTION}] ")
            raise ConfigError(f"{key} = {value!r}: must be an absolute path, or empty (off)")
    if cfg.metrics_interval < 1:
        raise ConfigError(f"metrics_interval = {cfg.metrics_interval}: must be a number of "
                          "seconds, at least 1")
    for key, field in SNAPSHOTTER_KEYS.items():
        value = getattr(cfg, field)
        if isinstance(value, str) and field not in OPTIONAL_PATHS \
                and not os.path.isabs(value):
            raise ConfigError(f"[{SNAPSHOTTER_SECTION}] {key} = {getattr(cfg, field)!r}: "
                              "must be an absolute path")
    if not os.path.isabs(cfg.cvmfs_root):
        raise ConfigError(f"cvmfs_root = {cfg.cvmfs_root!r}: must be an absolute path")
    from .thin import DescriptorError, check_repository_name

    for repo in cfg.repositories:
        try:
            check_repository_name(repo)
        except DescriptorError as e:
            raise ConfigError(f"repositories: {e}") from None
    return cfg


def parse_list(value: str) -> Tuple[str, ...]:
    """A comma (or space) separated list, as in CVMFS_REPOSITORIES."""
    return tuple(sorted({v for v in value.replace(",", " ").split() if v}))


def parse(text: str, source: str = "<config>") -> Config:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {e}") from None
    known = {f.name: f for f in dataclasses.fields(Config)
             if f.name not in SNAPSHOTTER_KEYS.values()}
    values: Dict[str, Any] = {}
    for section in parser.sections():
        if section == SNAPSHOTTER_SECTION:
            for key, raw in parser.items(section):
                if key not in SNAPSHOTTER_KEYS:
                    raise ConfigError(
                        f"{source}: unknown key {key!r} in [{SNAPSHOTTER_SECTION}]; known "
                        "keys: " + ", ".join(sorted(SNAPSHOTTER_KEYS)))
                field = SNAPSHOTTER_KEYS[key]
                values[field] = (_parse_bool(key, raw)
                                 if isinstance(getattr(Config, field), bool) else raw)
            continue
        if section != SECTION:
            raise ConfigError(f"{source}: unknown section [{section}] (expected [{SECTION}] "
                              f"or [{SNAPSHOTTER_SECTION}])")
        for key, raw in parser.items(section):
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in [{SECTION}]; known keys: "
                    + ", ".join(sorted(known))
                )
            kind = known[key].type
            if kind in (bool, "bool"):
                values[key] = _parse_bool(key, raw)
            elif key == "metrics_interval":
                values[key] = parse_seconds(key, raw)
            elif kind in (int, "int"):
                values[key] = parse_size(key, raw)
            elif key == "repositories":
                values[key] = parse_list(raw)
            else:
                values[key] = raw
    try:
        return validate(Config(**values))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: Optional[str]) -> Config:
    """Read `path`; a missing file at the default path means all defaults."""
    target = path or DEFAULT_CONFIG_PATH
    try:
        with open(target, encoding="utf-8") as f:
            return parse(f.read(), target)
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"configuration file {target} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"configuration file {target} is not UTF-8 text ({e.reason} at "
                          f"byte {e.start}): write it as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {target} is a directory: name the file "
                          "(--config FILE)") from None
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file {target}: "
                          f"{e.strerror or e}") from None


def configured_mode(path: Optional[str]) -> str:
    """"snapshotter" when the configuration file has a [snapshotter] section (the
    graphdriver role writes one only in snapshotter mode), else "plugin"."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path or DEFAULT_CONFIG_PATH, encoding="utf-8") as f:
            parser.read_string(f.read())
    except (OSError, configparser.Error):
        return "plugin"
    return "snapshotter" if parser.has_section(SNAPSHOTTER_SECTION) else "plugin"


# Where the daemons keep their own state on a node (not the layers: those are in the home).
STATE_DIR = "/run/cvmfs-graphdriver"
# The cvmfs volumes dockerd has made (they outlive a reboot, as dockerd's record of them).
VOLUMES_STATE_DIR = "/var/lib/cvmfs-graphdriver/volumes"


def socket_key(socket_path: str) -> str:
    """A file name for the daemon serving `socket_path`: daemons on other sockets never
    pick up each other's state."""
    return os.path.normpath(socket_path).strip("/").replace("/", "-")


def state_file(socket_path: str) -> str:
    """Where the daemon serving `socket_path` records dockerd's Init (gone after a reboot,
    like the mounts)."""
    return os.path.join(STATE_DIR, f"{socket_key(socket_path)}.init.json")


def volumes_state_file(socket_path: str) -> str:
    return os.path.join(VOLUMES_STATE_DIR, f"{socket_key(socket_path)}.json")
