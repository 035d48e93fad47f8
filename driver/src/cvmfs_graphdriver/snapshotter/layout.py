"""The snapshotter's home, laid out as containerd's overlayfs snapshotter lays out its root.

    <home>/metadata.db             snapshot metadata (SQLite, see metastore.py)
    <home>/lock                    flock()ed by the daemon using the home (one at a time)
    <home>/snapshots/<id>/fs/      the snapshot's files: the upper dir of an active
                                   snapshot, a lower dir once committed
    <home>/snapshots/<id>/work/    overlay work dir (active snapshots only)
    <home>/snapshots/<id>/masks/   whiteout masks between the CVMFS layers of a remote
    <home>/snapshots/<id>/masks.json   snapshot (built on first use; the index last)
    <home>/markers/<sha256>.json   the whiteout markers of one CVMFS layer (found once)
    <home>/l/<short>               short links to CVMFS layers and masks: lowerdirs that
                                   share <home>/, which containerd shortens (relative to
                                   it) when a deep stack's options exceed one page
    <home>/staging/                new snapshot directories being made (renamed into
                                   snapshots/ when their metadata commits) and removed
                                   ones being deleted; nothing in it is ever in use

<id> is the metastore's integer id. Pure naming: no system calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SNAPSHOTS_DIR = "snapshots"
STAGING_DIR = "staging"
METADATA_DB = "metadata.db"
LOCK_FILE = "lock"
MARKERS_DIR = "markers"
LINKS_DIR = "l"


@dataclass(frozen=True)
class SnapshotterLayout:
    home: str

    @property
    def snapshots(self) -> str:
        return os.path.join(self.home, SNAPSHOTS_DIR)

    @property
    def staging(self) -> str:
        return os.path.join(self.home, STAGING_DIR)

    @property
    def metadata_db(self) -> str:
        return os.path.join(self.home, METADATA_DB)

    @property
    def lock(self) -> str:
        return os.path.join(self.home, LOCK_FILE)

    @property
    def links(self) -> str:
        return os.path.join(self.home, LINKS_DIR)

    @property
    def marker_cache_dir(self) -> str:
        return os.path.join(self.home, MARKERS_DIR)

    def dir(self, snapshot_id: str) -> str:
        if not snapshot_id.isdigit():
            raise ValueError(f"invalid snapshot id {snapshot_id!r}")
        return os.path.join(self.snapshots, snapshot_id)

    def fs(self, snapshot_id: str) -> str:
        """containerd's upperPath(id)."""
        return os.path.join(self.dir(snapshot_id), "fs")

    def work(self, snapshot_id: str) -> str:
        """containerd's workPath(id)."""
        return os.path.join(self.dir(snapshot_id), "work")

    def masks(self, snapshot_id: str) -> str:
        """Whiteout masks of a remote snapshot's CVMFS layers."""
        return os.path.join(self.dir(snapshot_id), "masks")

    def masks_index(self, snapshot_id: str) -> str:
        return os.path.join(self.dir(snapshot_id), "masks.json")
