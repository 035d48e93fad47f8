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
                    "trust_unrecorded_layers": "snapshotter_trust_unrecorded_layers"}
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
    # [snapshotter] section
    snapshotter_socket: str = "/run/cvmfs-graphdriver/snapshotter.sock"
    snapshotter_home: str = "/var/lib/cvmfs-graphdriver/snapshotter"
    snapshotter_trust_unrecorded_layers: bool = False

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


def validate(cfg: Config) -> Config:
    if cfg.max_layer_bytes < 0:
        raise ConfigError(f"max_layer_bytes = {cfg.max_layer_bytes}: must be 0 (no limit of "
                          "its own) or a number of bytes")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level = {cfg.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    if not os.path.isabs(cfg.socket):
        raise ConfigError(f"socket = {cfg.socket!r}: must be an absolute path")
    for key, field in SNAPSHOTTER_KEYS.items():
        value = getattr(cfg, field)
        if isinstance(value, str) and not os.path.isabs(value):
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
