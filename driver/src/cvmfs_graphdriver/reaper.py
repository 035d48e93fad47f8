"""Removing directory trees off the caller's path: a container's files are freed after
its Remove has returned (issue 10).

`docker rm` waits on the graph driver's Remove, and most of a Remove is the kernel
unlinking what the container wrote (6.6 ms for a 20 MB file here; a job that wrote
gigabytes into its container waits seconds). The layer leaves the home at once (renamed
into the staging area, where nothing looks like a layer), and its files go in the
background, in one thread, one tree after another.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Deque

from .fdtree import remove_tree

log = logging.getLogger(__name__)


class Reaper:
    """Removes trees in the order given, in one thread that runs while there is work.

    wait() returns once every tree given before it was called is gone, or failed to go
    (trees given meanwhile do not hold it up): a failure is logged and the tree left where
    it is, in the staging area, which the driver's next start empties."""

    def __init__(self, name: str = "cvmfs-reaper") -> None:
        self._name = name
        self._queue: Deque[str] = collections.deque()
        # Trees are done in the order given: wait() waits for `_done` to reach the count
        # given when it was called.
        self._given = 0
        self._done = 0
        self._running = False  # a thread is serving the queue
        self._cond = threading.Condition()

    def submit(self, path: str) -> None:
        """Remove the tree at `path` (already renamed out of sight) soon."""
        with self._cond:
            self._queue.append(path)
            self._given += 1
            if self._running:
                return
            self._running = True
            try:
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
                return
            except BaseException:  # no thread to be had: remove it here, as before
                self._running = False
                self._queue.pop()
        self._remove(path)

    def wait(self) -> None:
        """Until every tree given so far is gone (or failed to go)."""
        with self._cond:
            given = self._given
            self._cond.wait_for(lambda: self._done >= given)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._running = False
                    return
                path = self._queue.popleft()
            self._remove(path)

    def _remove(self, path: str) -> None:
        try:
            remove_tree(path)
        except Exception as e:  # noqa: BLE001 (logged; the tree waits for the next start)
            log.warning("cannot remove %s, the files of a removed layer: %s; the driver's "
                        "next start removes them", path, e)
        finally:
            with self._cond:
                self._done += 1
                self._cond.notify_all()
