"""kill -9 of the daemons at random points of Docker's and containerd's operations (issue 11).

Knobs (environment):

    CVMFS_GRAPHDRIVER_KILL_ROUNDS   kills per operation (default 2: CI stays within minutes;
                                    a local soak sets 10 or more)
    CVMFS_GRAPHDRIVER_KILL_SEED     the random generator's seed (default 11): a failing run
                                    is repeated with the same delays

Every kill is printed (operation, delay, whether the operation was still running) so a
failure names the point that broke it.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

HERE = os.path.dirname(__file__)
TESTS = os.path.dirname(HERE)
for sub in (TESTS, os.path.join(TESTS, "integration"), os.path.join(TESTS, "snapshotter"),
            os.path.join(TESTS, "driver")):
    if sub not in sys.path:
        sys.path.insert(0, sub)

from harness import DriverProcess, need  # noqa: E402

from cvmfs_graphdriver import mounts  # noqa: E402
from cvmfs_graphdriver.config import state_file  # noqa: E402

PLUGIN_NAME = os.environ.get("CVMFS_GRAPHDRIVER_TEST_PLUGIN", "cvmfs")


@pytest.fixture
def driver(tmp_path):
    """A driver daemon of its own (no dockerd) and the home to Init it with; afterwards
    its mounts and its state file go, as a reboot would take them."""
    need(os.geteuid() == 0, "needs root (overlay mounts, the plugin socket)")
    d = DriverProcess(f"{PLUGIN_NAME}d{os.getpid()}", str(tmp_path / "driver")).start()
    home = str(tmp_path / "home")
    yield d, home
    d.stop()
    for point in sorted(mounts.mounts_under(home), key=len, reverse=True):
        mounts.unmount(point)
    if os.path.exists(state_file(d.socket)):
        os.unlink(state_file(d.socket))


@pytest.fixture
def rng(request) -> random.Random:
    """Seeded per test: the same seed gives the same delays for the same test."""
    seed = os.environ.get("CVMFS_GRAPHDRIVER_KILL_SEED", "11")
    return random.Random(f"{seed}:{request.node.name}")
