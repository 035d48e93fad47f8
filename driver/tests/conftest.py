"""Shared fixtures. Integration fixtures start real components; nothing is mocked.

A test that cannot get what it needs is skipped locally with the reason shown, and
*fails* under CI (CI=true), so a missing install step can never pass as green.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import (  # noqa: E402
    IN_CI,
    CvmfsRepos,
    Dockerd,
    DriverProcess,
    Registry,
    import_busybox,
    need,
    need_docker,
    real_cvmfs_available,
)
from resilience import TALLY, Tally  # noqa: E402

PLUGIN_NAME = os.environ.get("CVMFS_GRAPHDRIVER_TEST_PLUGIN", "cvmfs")


@pytest.fixture
def tally() -> Tally:
    """What a hostile-input, fault or load test tried (resilience.py)."""
    return TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    if TALLY.ran():
        terminalreporter.write_line(TALLY.line())


@pytest.fixture
def as_root() -> None:
    need(os.geteuid() == 0, "needs root (mounts, mknod, chown)")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cgd"))


# Repositories of real CernVM-FS (a stratum 0 here, read through real client mounts) ...
CVMFS_REPOS = ("test.repo", "ducc.repo")
# ... and one plain directory tree, the `dir:` layer store's own case.
PLAIN_REPOS = ("dir.repo",)
THIN_REPOS = CVMFS_REPOS + PLAIN_REPOS


@pytest.fixture(scope="session")
def cvmfs(workdir):
    """The thin-image repositories (harness.CvmfsRepos): real CernVM-FS where
    scripts/cvmfs.sh installed it; otherwise, loudly, local directories standing in for
    it, which CI refuses."""
    need(os.geteuid() == 0, "needs root for mounts")
    real = real_cvmfs_available()
    if not real:
        need(not IN_CI, "no real CernVM-FS here (scripts/cvmfs.sh install): CI runs the "
             "thin-image tests on a real stratum 0 and client")
        warnings.warn("NO REAL CERNVM-FS: the thin-image tests read local directories "
                      "standing in for the repositories (scripts/cvmfs.sh install)", stacklevel=2)
    repos = CvmfsRepos(workdir, list(CVMFS_REPOS), list(PLAIN_REPOS), real).start()
    yield repos
    repos.stop()


@pytest.fixture(scope="session")
def driver_proc(workdir, cvmfs):
    need_docker()
    d = DriverProcess(PLUGIN_NAME, os.path.join(workdir, "driver"),
                      ["--cvmfs-root", cvmfs.root, "--repositories", ",".join(THIN_REPOS)]).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def dockerd(driver_proc, workdir):
    """dockerd using our driver (`-s cvmfs`)."""
    d = Dockerd(os.path.join(workdir, "dockerd-cvmfs"), PLUGIN_NAME).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def ref_dockerd(workdir):
    """dockerd using the built-in overlay2 driver, the reference for differential tests."""
    need_docker()
    d = Dockerd(os.path.join(workdir, "dockerd-overlay2"), "overlay2").start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def registry(workdir):
    need_docker()
    r = Registry(os.path.join(workdir, "registry")).start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def busybox(dockerd, workdir) -> str:
    return import_busybox(dockerd, workdir)
