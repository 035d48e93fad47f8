"""CVMFS repositories as Docker volumes: the `VolumeDriver` face of the plugin.

    docker run --mount type=volume,volume-driver=cvmfs,src=REPO,dst=/cvmfs/REPO ...
    docker run -v REPO:/cvmfs/REPO --volume-driver cvmfs ...

A volume is named after a repository; only repositories on the node's allow-list
(`repositories`) are volumes, and they take no options. Mount answers the repository's
own directory <cvmfs_root>/REPO (opened first, so autofs mounts it), checked to be that
directory and nothing else: dockerd bind-mounts it into the container. Nothing is
mounted or written here; a CVMFS repository is read-only, so the container's view is.

State (which volumes exist, which mount IDs use each) is one small root-owned JSON file,
replaced atomically on each change. It lives under /var/lib so volumes outlive a reboot as
dockerd's own record of them does; mount IDs are kept with the boot they were made in and
dropped after a reboot (no container survives one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Protocol, Set

from .errors import DriverError
from .files import atomic_write
from .thin import DescriptorError, check_allowed, check_repository_name

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 22
# dockerd's mount IDs are 64 hex digits; anything printable and short is kept.
_MOUNT_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_MOUNTS_PER_VOLUME = 4096
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def _boot_id() -> str:
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class Volumes:
    """The VolumeDriver calls, one method each. Thread-safe; every change is saved
    before it is answered."""

    def __init__(self, cvmfs_root: str, allowed: Collection[str], state_file: str) -> None:
        self.cvmfs_root = cvmfs_root
        self.allowed = frozenset(allowed)
        self.state_file = state_file
        self._lock = threading.Lock()
        self._boot = _boot_id()
        # name -> {"CreatedAt": str, "Mounts": set of mount IDs}
        self._volumes: Dict[str, Dict[str, Any]] = {}
        self._load()

    # ------------------------------------------------------------------ state

    def _load(self) -> None:
        try:
            with open(self.state_file, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("volumes: cannot read %s (%s): starting with no volumes",
                        self.state_file, e)
            return
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError("too large")
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError("unknown format")
            same_boot = bool(self._boot) and doc.get("boot_id") == self._boot
            for name, entry in (doc.get("volumes") or {}).items():
                check_repository_name(name)
                mounts = entry.get("Mounts") if same_boot else []
                if not isinstance(mounts, list):
                    mounts = []
                self._volumes[name] = {
                    "CreatedAt": str(entry.get("CreatedAt") or ""),
                    "Mounts": {m for m in mounts if isinstance(m, str)
                               and _MOUNT_ID_RE.match(m)},
                }
        except (ValueError, AttributeError, DescriptorError) as e:
            log.warning("volumes: ignoring unusable state file %s (%s): starting with no "
                        "volumes", self.state_file, e)
            self._volumes = {}

    def _save(self) -> None:
        doc = {"version": STATE_VERSION, "boot_id": self._boot, "volumes": {
            name: {"CreatedAt": v["CreatedAt"], "Mounts": sorted(v["Mounts"])}
            for name, v in sorted(self._volumes.items())}}
        try:
            os.makedirs(os.path.dirname(self.state_file), mode=0o700, exist_ok=True)
            atomic_write(self.state_file, json.dumps(doc, indent=1) + "\n")
        except OSError as e:
            raise DriverError(f"cannot record the cvmfs volumes in {self.state_file}: {e}") \
                from None

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Run a change under the lock; saved, or undone when it cannot be saved."""
        with self._lock:
            before = {n: {"CreatedAt": v["CreatedAt"], "Mounts": set(v["Mounts"])}
                      for n, v in self._volumes.items()}
            try:
                yield
                self._save()
            except BaseException:
                self._volumes = before
                raise

    # ------------------------------------------------------------------ checks

    def _hint(self) -> str:
        listed = ", ".join(sorted(self.allowed)) or "none"
        return (f"a cvmfs volume is named after a CVMFS repository this node allows "
                f"(allowed: {listed})")

    def _name(self, call: str, name: object) -> str:
        """A well-formed repository name (the one check, thin.check_repository_name)."""
        try:
            return check_repository_name(name)
        except DescriptorError as e:
            raise DriverError(f"{call}: {e}: {self._hint()}") from None

    def _allowed_name(self, call: str, name: object) -> str:
        repo = self._name(call, name)
        check_allowed(repo, self.allowed, f"{call}: volume {repo}")
        return repo

    def _known(self, call: str, name: object) -> str:
        repo = self._name(call, name)
        if repo not in self._volumes:
            raise DriverError(f"{call}: no such cvmfs volume {repo}")
        return repo

    def _path(self, repo: str) -> str:
        """Where the repository is, as a path (no I/O in the repository)."""
        return os.path.join(os.path.realpath(self.cvmfs_root), repo)

    def resolve(self, call: str, repo: str) -> str:
        """The repository's directory, made present and checked to be exactly it."""
        wanted = self._path(repo)
        try:
            # Opening (not stat) makes autofs mount the repository. Only as a directory:
            # O_DIRECTORY refuses anything else before opening it (a FIFO would block).
            fd = os.open(wanted, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.close(fd)
        except OSError as e:
            what = "is not a directory" if e.errno == errno.ENOTDIR else e.strerror
            raise DriverError(
                f"{call}: CVMFS repository {repo} is not available at {wanted} ({what}): "
                f"check the CVMFS client on this node (`cvmfs_config probe {repo}`, "
                f"`ls {wanted}`) and that {repo} is in CVMFS_REPOSITORIES") from None
        real = os.path.realpath(wanted)
        if real != wanted:
            raise DriverError(f"{call}: {wanted} resolves to {real}, not to repository "
                              f"{repo} itself; refusing to mount it")
        return real

    # ------------------------------------------------------------------ calls

    def create(self, name: object, opts: object) -> None:
        repo = self._allowed_name("VolumeDriver.Create", name)
        if opts:
            keys = ", ".join(sorted(str(k) for k in opts)) if isinstance(opts, dict) \
                else repr(opts)
            raise DriverError(
                f"VolumeDriver.Create: volume {repo}: cvmfs volumes take no options (got: "
                f"{keys}); the volume is the repository as published, read-only")
        with self._changing():
            if repo not in self._volumes:
                self._volumes[repo] = {
                    "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "Mounts": set()}
                log.info("volume %s created", repo)

    def remove(self, name: object) -> None:
        repo = self._name("VolumeDriver.Remove", name)
        with self._changing():
            entry = self._volumes.pop(repo, None)
        if entry and entry["Mounts"]:
            # dockerd removes only volumes it no longer uses: these are left over (a
            # dockerd that died with containers running). Nothing of ours is mounted.
            log.warning("volume %s removed with stale mount IDs %s", repo,
                        ", ".join(sorted(entry["Mounts"])))

    def mount(self, name: object, mount_id: object) -> str:
        call = "VolumeDriver.Mount"
        repo = self._allowed_name(call, name)  # again: the allow-list may have changed
        if not isinstance(mount_id, str) or not _MOUNT_ID_RE.match(mount_id):
            raise DriverError(f"{call}: volume {repo}: invalid mount ID {mount_id!r}")
        path = self.resolve(call, repo)
        with self._changing():
            entry = self._volumes.setdefault(repo, {"CreatedAt": "", "Mounts": set()})
            if mount_id not in entry["Mounts"] and \
                    len(entry["Mounts"]) >= MAX_MOUNTS_PER_VOLUME:
                raise DriverError(f"{call}: volume {repo} already has "
                                  f"{MAX_MOUNTS_PER_VOLUME} mounts")
            entry["Mounts"].add(mount_id)
        log.info("volume %s mounted (id %s, %d in use): %s", repo, mount_id,
                 len(entry["Mounts"]), path)
        return path

    def unmount(self, name: object, mount_id: object) -> None:
        call = "VolumeDriver.Unmount"
        repo = self._name(call, name)
        if not isinstance(mount_id, str):
            raise DriverError(f"{call}: volume {repo}: invalid mount ID {mount_id!r}")
        with self._changing():
            entry = self._volumes.get(repo)
            if entry is None or mount_id not in entry["Mounts"]:
                log.info("volume %s: unmount of unknown mount ID %r (nothing to do)", repo,
                         mount_id)
                return
            entry["Mounts"].discard(mount_id)
        log.info("volume %s unmounted (id %s, %d in use)", repo, mount_id,
                 len(entry["Mounts"]))

    def _describe(self, repo: str) -> Dict[str, Any]:
        entry = self._volumes[repo]
        out: Dict[str, Any] = {"Name": repo}
        if entry["Mounts"]:
            out["Mountpoint"] = self._path(repo)
        return out

    def path(self, name: object) -> str:
        with self._lock:
            repo = self._known("VolumeDriver.Path", name)
            return str(self._describe(repo).get("Mountpoint", ""))

    def get(self, name: object) -> Dict[str, Any]:
        with self._lock:
            repo = self._known("VolumeDriver.Get", name)
            out = self._describe(repo)
            entry = self._volumes[repo]
            if entry["CreatedAt"]:
                out["CreatedAt"] = entry["CreatedAt"]
            out["Status"] = {
                "Repository": repo, "Path": self._path(repo), "ReadOnly": True,
                "Allowed": repo in self.allowed, "Mounts": len(entry["Mounts"])}
            return out

    def list(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [self._describe(repo) for repo in sorted(self._volumes)]

    def mount_ids(self, name: str) -> Set[str]:
        with self._lock:
            return set(self._volumes.get(name, {}).get("Mounts", ()))


# ---------------------------------------------------------------------------- routes

class Request(Protocol):
    """What a route reads of a request (server.Request): its JSON body."""

    def json(self) -> Dict[str, Any]: ...


VolumeRoute = Callable[[Volumes, Request], Dict[str, Any]]


def _create(v: Volumes, r: Request) -> Dict[str, Any]:
    v.create(r.json().get("Name"), r.json().get("Opts"))
    return {}


def _remove(v: Volumes, r: Request) -> Dict[str, Any]:
    v.remove(r.json().get("Name"))
    return {}


def _unmount(v: Volumes, r: Request) -> Dict[str, Any]:
    v.unmount(r.json().get("Name"), r.json().get("ID"))
    return {}


VOLUME_ROUTES: Dict[str, VolumeRoute] = {
    "VolumeDriver.Create": _create,
    "VolumeDriver.Remove": _remove,
    "VolumeDriver.Mount": lambda v, r: {
        "Mountpoint": v.mount(r.json().get("Name"), r.json().get("ID"))},
    "VolumeDriver.Unmount": _unmount,
    "VolumeDriver.Path": lambda v, r: {"Mountpoint": v.path(r.json().get("Name"))},
    "VolumeDriver.Get": lambda v, r: {"Volume": v.get(r.json().get("Name"))},
    "VolumeDriver.List": lambda v, r: {"Volumes": v.list()},
    "VolumeDriver.Capabilities": lambda v, r: {"Capabilities": {"Scope": "local"}},
}


def implements(graph: bool, volumes: Optional[Volumes]) -> List[str]:
    """What Plugin.Activate answers."""
    return (["GraphDriver"] if graph else []) + (["VolumeDriver"] if volumes else [])
