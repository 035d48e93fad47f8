"""Storage operations of the graph driver (overlay2 semantics), one method per protocol call.

Layer ids arrive validated (server.Request checks them where they enter); the on-disk
names come from layout.Layout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from . import __version__, archive, fdtree, metrics, mounts, whiteouts
from .changes import Change, changes_dirs, changes_in_upper, changes_size
from .config import Config
from .errors import DriverError, NotFoundError
from .files import atomic_write, fsync_dir, read, write_all_durably, write_durably
from .layout import (
    LayerDir,
    LayerId,
    Layout,
    is_layer_name,
    link_target,
    lower_chain,
    new_short_id,
    overlay_options,
)
from .reaper import Reaper
from .thin import DescriptorError
from .thinstack import ThinStacks

DiffWriter = Callable[[IO[bytes]], None]

log = logging.getLogger(__name__)


@dataclass
class _LayerLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # holding or waiting: the entry goes with the last of them


class Driver:
    """Layers under one home directory, laid out as overlay2 lays them out."""

    def __init__(self, config: Config, state_file: Optional[str] = None) -> None:
        self.config = config
        # Where Init's home is remembered: dockerd calls Init only once, so a driver
        # restarted under a running dockerd must resume from it (see restore()).
        self.state_file = state_file
        self._layout: Optional[Layout] = None
        self._thin: Optional[ThinStacks] = None
        self._refs: Dict[str, int] = {}
        self._refs_lock = threading.Lock()
        self._locks: Dict[str, _LayerLock] = {}  # only while someone holds or waits
        self._locks_lock = threading.Lock()
        self.native_diff = True
        self._extra_opts = ""
        self.backing_fs = "unknown"
        # Layers made by CreateReadWrite in this run (containers' and their init layers):
        # their Remove leaves the freeing of their files to the reaper. A layer not known
        # to be one (an image layer, or any layer after a restart) is removed in the call.
        self._read_write: Set[str] = set()
        self._reaper = Reaper()
        self._recorded: Optional[Dict[str, Any]] = None  # what the state file holds

    # ------------------------------------------------------------------ helpers

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise DriverError("the driver is not initialised yet: dockerd must call Init first")
        return self._layout

    @contextlib.contextmanager
    def _locked(self, layer_id: str) -> Iterator[None]:
        with self._locks_lock:
            entry = self._locks.get(layer_id)
            if entry is None:
                entry = self._locks[layer_id] = _LayerLock()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._locks_lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[layer_id]

    def _complete(self, layer_id: str) -> bool:
        d = self.layout.dir(layer_id)
        return os.path.isdir(d) and not os.path.exists(self.layout.applying_marker(layer_id))

    def _require(self, layer_id: str) -> None:
        if not self._complete(layer_id):
            if os.path.isdir(self.layout.dir(layer_id)):
                raise NotFoundError(
                    f"layer {layer_id} is incomplete (an ApplyDiff was interrupted); "
                    "remove it and pull the image again"
                )
            raise NotFoundError(f"layer {layer_id} does not exist in {self.layout.home}")

    def _lower(self, layer_id: str) -> str:
        try:
            return read(self.layout.lower_file(layer_id))
        except FileNotFoundError:
            return ""

    def _parent(self, layer_id: str) -> str:
        try:
            return read(self.layout.parent_file(layer_id))
        except FileNotFoundError:
            return ""

    def _planned_lower_dirs(self, layer_id: str) -> List[str]:
        """Absolute lower dirs of the layer, uppermost first, thin layers as planned
        (for reporting: nothing is resolved in CVMFS, built or written)."""
        out: List[str] = []
        for entry in filter(None, self._lower(layer_id).split(":")):
            tid = self.thin.layer_of_entry(entry)
            if tid is not None and self.thin.is_thin(tid):
                out.extend(self.thin.planned_dirs(tid))
                continue
            link = os.path.join(self.layout.home, entry)
            with contextlib.suppress(OSError):
                out.append(os.path.normpath(os.path.join(self.layout.links, os.readlink(link))))
        return out

    @property
    def thin(self) -> ThinStacks:
        if self._thin is None:
            raise DriverError("the driver is not initialised yet: dockerd must call Init first")
        return self._thin

    # ------------------------------------------------------------------ Init

    def init(
        self, home: str, opts: Optional[List[str]], uid_maps: object, gid_maps: object,
        *, recorded_refs: Optional[Mapping[str, object]] = None,
    ) -> None:
        if not home or not os.path.isabs(home):
            raise DriverError(f"Init: home must be an absolute path, got {home!r}")
        if uid_maps or gid_maps:
            raise DriverError(
                "user namespace remapping (dockerd --userns-remap) is not supported by the cvmfs "
                "graph driver; start dockerd without it"
            )
        if opts:
            raise DriverError(
                f"unknown storage options {opts}: the cvmfs graph driver takes none "
                "(remove --storage-opt / \"storage-opts\" from the dockerd configuration)"
            )
        # The real path: mountinfo names mounts by it (Cleanup and adoption look them up).
        layout = Layout(os.path.realpath(home))
        os.makedirs(layout.home, mode=0o710, exist_ok=True)
        os.makedirs(layout.links, mode=0o700, exist_ok=True)
        # The probes below make directories: in staging, which recovery empties, so a
        # kill during Init leaves nothing that looks like a layer.
        os.makedirs(layout.staging, mode=0o700, exist_ok=True)
        magic = mounts.fs_magic(layout.home)
        self.backing_fs = mounts.fs_name(layout.home)
        if magic == mounts.OVERLAY_MAGIC:
            raise DriverError(
                f"driver home {layout.home} is on overlayfs, which cannot hold overlay upper "
                "directories; put dockerd's data-root on ext4, xfs or a volume"
            )
        if not mounts.supports_d_type(layout.staging):
            raise DriverError(
                f"the filesystem of {layout.home} ({self.backing_fs}) does not support d_type, "
                "which overlayfs needs; for xfs, reformat with ftype=1"
            )
        self.native_diff = mounts.supports_native_diff(layout.staging)
        self._extra_opts = "index=off," if mounts.overlay_index_param() else ""
        self._reaper.wait()  # an earlier Init's removals: recovery empties the staging area
        with self._refs_lock:
            self._layout = layout
            self._thin = ThinStacks(layout, self.config, self._locked)
            self._refs = {}
        self._read_write.clear()
        self._recover(recorded_refs or {})
        with self._refs_lock:
            self._recorded = None  # Init writes the file whatever it holds
            self._save_state()
        log.info("initialised home %s on %s (native diff %s)", layout.home, self.backing_fs,
                 self.native_diff)

    def _save_state(self) -> None:
        """Record the home and how many references dockerd holds on each mounted layer
        (a container's Get, and one more for each commit, cp or export in progress):
        a driver restarted under a running dockerd adopts the mounts with those counts,
        so the Put of an interrupted commit does not unmount a running container's root.
        A single reference is not written: the mount itself says it (recovery adopts a
        mounted layer with one), so a container's start and stop write nothing; the file
        is written by Init and when a count above one changes, and not rewritten when
        what it would hold is what was last written.
        Called with _refs_lock held."""
        if not self.state_file or self._layout is None:
            return
        state = {"Home": self._layout.home,
                 "Refs": {name: n for name, n in self._refs.items() if n > 1}}
        if state == self._recorded:
            return
        try:
            os.makedirs(os.path.dirname(self.state_file), mode=0o755, exist_ok=True)
            # Not flushed to disk: it serves a restart of the driver alone (the mounts it
            # counts do not outlive a reboot, nor does /run).
            atomic_write(self.state_file, json.dumps(state) + "\n", durable=False)
        except OSError as e:
            log.warning("cannot record the driver's state in %s (a restart of the driver "
                        "will need a dockerd restart): %s", self.state_file, e)
        else:
            self._recorded = state

    def restore(self) -> bool:
        """Init again with the home of the last Init, if one was recorded.

        dockerd calls Init once at its start; when only the driver restarts (crash,
        upgrade), it must carry on with the same home, adopting mounts still in use.
        """
        if not self.state_file:
            return False
        try:
            with open(self.state_file, encoding="utf-8") as f:
                state = json.load(f)
            home, refs = state["Home"], state.get("Refs", {})
            if not isinstance(refs, dict):
                raise TypeError("Refs is not an object")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable state file %s: %s", self.state_file, e)
            return False
        if not isinstance(home, str) or not os.path.isdir(home):
            log.info("recorded home %r is gone; waiting for dockerd's Init", home)
            return False
        try:
            self.init(home, None, None, None, recorded_refs=refs)
        except (OSError, DriverError) as e:
            log.warning("cannot resume with home %s from %s (waiting for dockerd's Init): %s",
                        home, self.state_file, e)
            return False
        log.info("resumed with home %s (recorded by the previous run)", home)
        return True

    def _recover(self, recorded_refs: Mapping[str, object]) -> None:
        """Make the home consistent after a crash, adopting mounts still in use. One
        layer that cannot be put right is logged and left as it is (it is reported
        incomplete, or keeps what blocks it): it must never stop the start-up."""
        layout = self.layout
        entries = mounts.read_mountinfo()
        staging = layout.staging
        for point in mounts.mounts_under(staging, entries):
            mounts.unmount(point)
        os.makedirs(staging, mode=0o700, exist_ok=True)
        for leftover in os.listdir(staging):
            self._recovery_step(f"clearing {staging}/{leftover}", fdtree.remove_tree,
                                os.path.join(staging, leftover))

        mounted = set(mounts.mounts_under(layout.home, entries))
        names = [LayerId(name) for name in sorted(os.listdir(layout.home))
                 if is_layer_name(name) and os.path.isdir(os.path.join(layout.home, name))]
        with_child = {self._parent(name) for name in names}
        for name in names:
            self._recovery_step(f"layer {name}", self._recover_layer, name, mounted,
                                recorded_refs.get(name), name in with_child)
        for short in os.listdir(layout.links):
            link = layout.short_link(short)
            with contextlib.suppress(OSError):
                if os.path.isabs(os.readlink(link)):
                    continue  # into CVMFS: checked when mounted, never touched here
            if not os.path.exists(link):
                log.warning("removing dangling link %s", link)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link)
        if self._refs:
            log.info("adopted %d mounts left by a previous run", len(self._refs))

    @staticmethod
    def _recovery_step(what: str, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception as e:  # whatever it is, the other layers and dockerd come first
            log.error("start-up recovery: %s failed, left as it is: %s: %s", what,
                      type(e).__name__, e, exc_info=not isinstance(e, (OSError, DriverError)))

    def _recover_layer(self, name: LayerId, mounted: Set[str], recorded: object,
                       has_child: bool) -> None:
        layout = self.layout
        merged = layout.merged(name)
        if os.path.exists(layout.applying_marker(name)):
            log.warning("layer %s: ApplyDiff was interrupted; removing the partial layer", name)
            if merged in mounted:
                mounts.unmount(merged)
            self._remove_layer_dir(name)
            return
        unapplied = os.path.exists(layout.unapplied_marker(name))
        if unapplied and not has_child and merged not in mounted:
            # Made by Create, never applied, never a parent: dockerd records a layer only
            # after its ApplyDiff, so none of its images has it. A Create whose answer the
            # kill cut off leaves this: dockerd's retry arrives with an empty body
            # (moby#33412), fails, and moby removes nothing after a failed Create.
            log.warning("layer %s: created but never applied (the Create's answer was lost?); "
                        "removing it", name)
            self._remove_layer_dir(name)
            return
        if name.endswith("-init") and not has_child and \
                not os.path.isdir(layout.dir(name[: -len("-init")])):
            # dockerd makes "<id>-init" (CreateReadWrite, Get, Put) right before "<id>",
            # removes it right after "<id>", and cleans nothing up when a step in between
            # fails (moby layerStore.initMount/CreateRWLayer): a kill that cut off one of
            # these answers (the retry has an empty body, moby#33412) leaves it, often
            # still mounted. No container of dockerd can use an init layer without its own.
            log.warning("layer %s: an init layer without its container layer (a docker run "
                        "interrupted by the driver's restart?); removing it", name)
            if merged in mounted:
                mounts.unmount(merged)
            self._remove_layer_dir(name)
            return
        try:
            short = read(layout.link_file(name))
        except FileNotFoundError:
            short = ""
        if short and not os.path.islink(layout.short_link(short)):
            log.warning("layer %s: recreating missing link l/%s", name, short)
            os.symlink(link_target(name), layout.short_link(short))
        if merged in mounted:
            # Still used (a container at least): as many Puts will come as the previous
            # run had Gets outstanding.
            count = recorded if isinstance(recorded, int) and recorded > 0 else 1
            self._refs[name] = count

    # ------------------------------------------------------------------ layers

    def create(self, layer_id: LayerId, parent: Optional[LayerId], mount_label: str,
               storage_opt: Optional[Dict[str, str]], *, read_write: bool) -> None:
        if storage_opt:
            raise DriverError(
                f"layer {layer_id}: storage options {sorted(storage_opt)} are not supported by "
                "the cvmfs graph driver (no per-container size quotas)"
            )
        layout = self.layout
        with self._locked(layer_id):
            if os.path.lexists(layout.dir(layer_id)):
                raise DriverError(f"layer {layer_id} already exists in {layout.home}")
            parent_link, parent_lower = None, ""
            if parent:
                self._require(parent)
                parent_link = read(layout.link_file(parent))
                parent_lower = self._lower(parent)
            try:
                lower = lower_chain(parent_link, parent_lower)
            except ValueError as e:
                raise DriverError(f"cannot create layer {layer_id}: {e}") from None

            staged = LayerDir(layout.staging_dir(layer_id))
            try:
                os.mkdir(staged.path, 0o700)
            except OSError as e:
                raise DriverError(f"cannot create layer {layer_id}: {_os_failure(e)}") from None
            try:
                os.mkdir(staged.diff, 0o755)
                os.chmod(staged.diff, 0o755)  # the layer root, whatever the umask
                short = new_short_id()
                files = [(staged.link_file, short)]
                if not read_write:
                    # Until its ApplyDiff: recovery removes a layer dockerd never learnt of.
                    files.append((staged.unapplied_marker, ""))
                if parent:
                    files += [(staged.lower_file, lower), (staged.parent_file, parent)]
                    os.mkdir(staged.work, 0o700)
                    if not os.path.exists(layout.committed_file(parent)):
                        # As overlay2 (and when it does): a layer with a child is
                        # immutable from now on (its next mount is read-only), whether it
                        # was made by Create or CreateReadWrite.
                        files.append((layout.committed_file(parent), ""))
                write_all_durably(files)  # flushed together: one journal commit
                os.rename(staged.path, layout.dir(layer_id))
            except BaseException as e:
                fdtree.remove_tree(staged.path)
                if isinstance(e, OSError):
                    raise DriverError(f"cannot create layer {layer_id}: {_os_failure(e)}"
                                      ) from None
                raise
            os.symlink(link_target(layer_id), layout.short_link(short))
            fsync_dir(layout.home)
            if read_write:
                self._read_write.add(layer_id)

    def remove(self, layer_id: LayerId) -> None:
        with self._locked(layer_id):
            if not os.path.lexists(self.layout.dir(layer_id)):
                return
            merged = self.layout.merged(layer_id)
            if mounts.is_mountpoint(merged):
                mounts.unmount(merged)
            with self._refs_lock:
                if self._refs.pop(layer_id, None) is not None:
                    self._save_state()  # else the recorded counts are unchanged
            self._remove_layer_dir(layer_id, deferred=layer_id in self._read_write)
            self._read_write.discard(layer_id)

    def _remove_layer_dir(self, layer_id: LayerId, *, deferred: bool = False) -> None:
        """Remove a layer: gone from the home when this returns. Its files are freed
        here, or (`deferred`) by the reaper soon after."""
        layout = self.layout
        self.thin.forget(layer_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.short_link(read(layout.link_file(layer_id))))
        # Move aside first: an interrupted removal leaves nothing that looks like a layer.
        doomed = layout.staging_dir(layer_id, "removing")
        os.rename(layout.dir(layer_id), doomed)
        if deferred:
            self._reaper.submit(doomed)
        else:
            fdtree.remove_tree(doomed)

    def wait_for_removals(self) -> None:
        """Until the files of every layer removed so far are freed."""
        self._reaper.wait()

    def exists(self, layer_id: LayerId) -> bool:
        return self._complete(layer_id)

    def get(self, layer_id: LayerId, mount_label: str = "") -> str:
        layout = self.layout
        with self._locked(layer_id):
            self._require(layer_id)
            lower = self._lower(layer_id)
            if not lower:
                return layout.diff(layer_id)
            merged = layout.merged(layer_id)
            with self._refs_lock:
                count = self._refs.get(layer_id, 0)
            if count > 0 and mounts.is_mountpoint(merged):
                with self._refs_lock:
                    self._refs[layer_id] = count + 1
                    self._save_state()
                return merged
            os.makedirs(merged, mode=0o700, exist_ok=True)
            if mounts.is_mountpoint(merged):
                count = 1  # mounted by an earlier run; its user still holds it
            else:
                readonly = os.path.exists(layout.committed_file(layer_id))
                try:
                    lower = self.thin.expand(lower)  # checks CVMFS before anything is mounted
                except BaseException as e:
                    metrics.mount_errors.inc()
                    if isinstance(e, DescriptorError):  # its repository no longer allowed
                        metrics.descriptor_errors.inc()
                    raise
                try:
                    opts = overlay_options(layout, layer_id, lower, readonly=readonly,
                                           extra=self._extra_opts, mount_label=mount_label)
                    mounts.mount_overlay(opts.data, opts.target, opts.relative_to)
                except (OSError, ValueError) as e:
                    metrics.mount_errors.inc()
                    raise DriverError(
                        f"cannot mount layer {layer_id} at {merged}: {e}. "
                        "Check `dmesg` for overlayfs messages."
                    ) from None
                count = 0
            with self._refs_lock:
                self._refs[layer_id] = count + 1
                self._save_state()
            return merged

    def put(self, layer_id: LayerId) -> None:
        with self._locked(layer_id):
            if not self._lower(layer_id):
                return
            with self._refs_lock:
                count = self._refs.get(layer_id, 0)
                if count > 1:
                    self._refs[layer_id] = count - 1
                    self._save_state()
                    return
                self._refs.pop(layer_id, None)
            merged = self.layout.merged(layer_id)
            try:
                mounts.unmount(merged)
            except OSError as e:
                raise DriverError(f"cannot unmount layer {layer_id} at {merged}: {e}") from None
            with self._refs_lock:
                self._save_state()  # after the unmount: a crash before it re-adopts the mount
            with contextlib.suppress(OSError):
                os.rmdir(merged)

    # ------------------------------------------------------------------ contents

    def apply_diff(self, layer_id: LayerId, parent: Optional[LayerId],
                   stream: IO[bytes]) -> int:
        layout = self.layout
        # A removed container's files are freed before a layer is unpacked: the space is
        # there for it, and the two do not compete for the disk.
        self._reaper.wait()
        with self._locked(layer_id):
            if not os.path.isdir(layout.dir(layer_id)):
                raise NotFoundError(f"ApplyDiff: layer {layer_id} does not exist (Create it first)")
            native = (parent or "") == self._parent(layer_id)
        if not native:
            return self._apply_naive(layer_id, stream)
        with self._locked(layer_id):
            marker = layout.applying_marker(layer_id)
            write_durably(marker, "")
            diff = layout.diff(layer_id)
            started = time.monotonic()
            result = _apply(layer_id, stream, diff, whiteouts.OverlayUpper(),
                            self.config.max_layer_bytes)
            applied = time.monotonic()
            size = fdtree.directory_size(diff)
            try:
                self.thin.record(layer_id)
            except DescriptorError as e:
                metrics.descriptor_errors.inc()
                raise DriverError(f"layer {layer_id} is a thin image layer that cannot be used: "
                                  f"{e}") from None
            measured = time.monotonic()
            if self.config.sync_layers:
                mounts.syncfs(diff)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.unapplied_marker(layer_id))
            os.unlink(marker)
            fsync_dir(layout.dir(layer_id))
            metrics.applied(size, time.monotonic() - started)
            log.info("layer %s: applied %d entries (%d whiteouts), %d bytes: %.3f s to unpack, "
                     "%.3f s to measure, %.3f s to flush", layer_id, result.entries,
                     result.whiteouts, size, applied - started, measured - applied,
                     time.monotonic() - measured)
            return size

    def _apply_naive(self, layer_id: LayerId, stream: IO[bytes]) -> int:
        """ApplyDiff against another parent than the layer's own: apply the tar onto the
        mounted layer, markers carried out as deletions (overlay2's fallback, moby's
        NaiveDiffDriver.ApplyDiff); the size is what moby's UnpackLayer counts."""
        started = time.monotonic()
        view = self.get(layer_id)
        try:
            result = _apply(layer_id, stream, view, whiteouts.Flatten(),
                            self.config.max_layer_bytes)
        finally:
            self.put(layer_id)
        if self.config.sync_layers:
            mounts.syncfs(self.layout.diff(layer_id))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.unapplied_marker(layer_id))
        metrics.applied(result.bytes, time.monotonic() - started)
        log.info("layer %s: applied %d entries onto the mounted layer (naive), %d bytes",
                 layer_id, result.entries, result.bytes)
        return result.bytes

    def _use_native(self, layer_id: LayerId, parent: Optional[LayerId]) -> bool:
        return self.native_diff and (parent or "") == self._parent(layer_id)

    @contextlib.contextmanager
    def _views(self, layer_id: LayerId,
               parent: Optional[LayerId]) -> Iterator[Tuple[str, Optional[str]]]:
        """Mounted views of a layer and (optionally) another layer, released afterwards."""
        view = self.get(layer_id)
        try:
            if not parent:
                yield view, None
                return
            pview = self.get(parent)
            try:
                yield view, pview
            finally:
                self.put(parent)
        finally:
            self.put(layer_id)

    def open_diff(self, layer_id: LayerId, parent: Optional[LayerId]) -> DiffWriter:
        """Check the layers exist, then return what writes the layer tar (so a missing
        layer is an error answer, not a broken stream)."""
        self._require(layer_id)
        if parent:
            self._require(parent)

        def write(out: IO[bytes]) -> None:
            if self._use_native(layer_id, parent):
                archive.write_layer_tar(out, self.layout.diff(layer_id))
                return
            with self._views(layer_id, parent) as (view, pview):
                archive.export_changes(out, view, changes_dirs(view, pview))

        return write

    def diff(self, layer_id: LayerId, parent: Optional[LayerId], out: IO[bytes]) -> None:
        self.open_diff(layer_id, parent)(out)

    def changes(self, layer_id: LayerId, parent: Optional[LayerId]) -> List[Change]:
        self._require(layer_id)
        # Always compare the mounted trees, as overlay2 has done since moby PR #37313
        # (Docker 18.06): reading the upper dir reports an opaque dir as deleted and misses
        # what it hides, so `docker diff` would differ from overlay2's.
        with self._views(layer_id, parent) as (view, pview):
            if pview is not None and self._use_native(layer_id, parent) \
                    and not self.thin.is_thin(layer_id):
                return changes_in_upper(self.layout.diff(layer_id), view, pview)
            return changes_dirs(view, pview)

    def diff_size(self, layer_id: LayerId, parent: Optional[LayerId]) -> int:
        self._require(layer_id)
        if self._use_native(layer_id, parent):
            return fdtree.directory_size(self.layout.diff(layer_id))
        with self._views(layer_id, parent) as (view, pview):
            return changes_size(view, pview)

    # ------------------------------------------------------------------ reporting

    def _layer_ids(self) -> List[LayerId]:
        return [LayerId(name) for name in os.listdir(self.layout.home)
                if is_layer_name(name) and self._complete(LayerId(name))]

    def status(self) -> List[List[str]]:
        if self._layout is None:
            return [["Driver Version", __version__], ["Initialised", "false"]]
        with self._refs_lock:
            mounted = [i for i, c in self._refs.items() if c > 0]
        layers = self._layer_ids()
        # Which repositories thin layers come from, and how many mounted layers
        # (running containers) stand on each.
        thin_layers: Dict[str, int] = {}
        for layer in layers:
            desc = self.thin.descriptor(layer)
            for repo in desc.repositories if desc else ():
                thin_layers[repo] = thin_layers.get(repo, 0) + 1
        in_use: Dict[str, int] = {}
        for user in mounted:
            for repo in self.thin.repositories_below(self._lower(user)):
                in_use[repo] = in_use.get(repo, 0) + 1
        rows = [
            ["Backing Filesystem", self.backing_fs],
            ["Supports d_type", "true"],
            ["Native Overlay Diff", str(self.native_diff).lower()],
            ["Layers", str(len(layers))],
            ["Mounted Layers", str(len(mounted))],
            ["Driver Home", self.layout.home],
            ["Driver Version", __version__],
            ["CVMFS Root", self.config.cvmfs_root],
            ["CVMFS Repositories", ", ".join(self.config.repositories) or "none (thin off)"],
            ["Thin Layers", str(sum(1 for la in layers if self.thin.is_thin(la)))],
        ]
        for repo in sorted(set(thin_layers) | set(in_use)):
            rows.append([f"Repository {repo}",
                         f"{thin_layers.get(repo, 0)} thin layers, "
                         f"{in_use.get(repo, 0)} mounted layers on them"])
        return rows

    def metric_samples(self) -> metrics.Samples:
        """The gauges of the metrics (metrics.Exporter's collect): layers by kind,
        mounted layers, and how many of them stand on each repository. Reads the home;
        runs in the metrics thread, never in a request."""
        layers = self._layer_ids() if self._layout is not None else []
        with self._refs_lock:
            mounted = [i for i, c in self._refs.items() if c > 0]
        thin_count = sum(1 for la in layers if self.thin.is_thin(la))
        per_repo: Dict[metrics.LabelValues, float] = {
            (repo,): 0.0 for repo in self.config.repositories}
        for user in mounted:
            for repo in self.thin.repositories_below(self._lower(user)):
                per_repo[(repo,)] = per_repo.get((repo,), 0.0) + 1
        return {
            metrics.LAYERS.name: {("regular",): float(len(layers) - thin_count),
                                  ("thin",): float(thin_count)},
            metrics.MOUNTED_LAYERS.name: {(): float(len(mounted))},
            metrics.REPOSITORY_MOUNTS.name: per_repo,
        }

    def metadata(self, layer_id: LayerId) -> Dict[str, str]:
        """What `docker inspect` shows under GraphDriver.Data; reads the home only."""
        self._require(layer_id)
        layout = self.layout
        meta = {
            "UpperDir": layout.diff(layer_id),
            "WorkDir": layout.work(layer_id),
            "MergedDir": layout.merged(layer_id),
        }
        lowers = self._planned_lower_dirs(layer_id)
        if lowers:
            meta["LowerDir"] = ":".join(lowers)
        own = self.thin.descriptor(layer_id)
        repos = self.thin.repositories_below(self._lower(layer_id))
        if own is not None:
            repos.update(own.repositories)
            meta["ThinLayers"] = " ".join(la.url for la in own.layers)
        if repos:
            meta["CVMFSRepositories"] = ",".join(sorted(repos))
        return meta

    def cleanup(self) -> None:
        """dockerd is shutting down: unmount every layer."""
        if self._layout is None:
            return
        self._reaper.wait()
        for point in mounts.mounts_under(self.layout.home):
            try:
                mounts.unmount(point)
            except OSError as e:
                log.error("cleanup: %s", e)
        with self._refs_lock:
            self._refs.clear()
            self._save_state()


def _apply(layer_id: LayerId, stream: IO[bytes], root: str, converter: whiteouts.Converter,
           max_bytes: int) -> archive.ApplyResult:
    """archive.apply_tar, its failures worded for the user with the layer named. The
    stream is read to its end: a body that breaks after the tar's end-of-archive (the
    client went away, a chunked body without its last chunk) is no complete layer."""
    try:
        result = archive.apply_tar(stream, root, converter, max_bytes)
        while stream.read(1 << 20):
            pass  # padding after the end-of-archive blocks, as tar writers add
        return result
    except DriverError as e:
        raise DriverError(f"layer {layer_id}: {e}") from None
    except OSError as e:
        raise DriverError(f"layer {layer_id}: applying the layer failed: {_os_failure(e)}"
                          ) from None


def _os_failure(e: OSError) -> str:
    """An OSError as the user reads it: what failed, and why, in words."""
    why = str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why += " (disk full: free space in the driver home, dockerd's data-root)"
    return why
