"""Shared fixtures. Integration fixtures start real components; nothing is mocked.

A test that cannot get what it needs is skipped locally with the reason shown, and
*fails* under CI (CI=true), so a missing install step can never pass as green.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import (  # noqa: E402
    Dockerd,
    DriverProcess,
    Registry,
    import_busybox,
    need,
    require_tool,
)


@dataclass(frozen=True)
class CvmfsTree:
    root: str  # what the driver has as cvmfs_root
    stores: Dict[str, str]  # repository -> the publisher-side tree (dir: store)


PLUGIN_NAME = os.environ.get("CVMFS_GRAPHDRIVER_TEST_PLUGIN", "cvmfs")


@pytest.fixture
def as_root() -> None:
    need(os.geteuid() == 0, "needs root (mounts, mknod, chown)")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cgd"))


def _need_docker() -> None:
    need(os.geteuid() == 0, "needs root to run dockerd")
    for tool in ("dockerd", "docker", "docker-registry"):
        try:
            require_tool(tool)
        except RuntimeError as e:
            need(False, str(e))


THIN_REPOS = ("test.repo", "ducc.repo")


@pytest.fixture(scope="session")
def cvmfs(workdir):
    """Stand-in for CernVM-FS (which cannot be installed here): for each repository, a
    publisher-side directory tree (`store`) mounted read-only, as a CVMFS client would
    show it, at <root>/<repo>. The driver reads thin layers from <root> only."""
    need(os.geteuid() == 0, "needs root for bind mounts")
    root = os.path.join(workdir, "cvmfs")
    stores = {}
    for repo in THIN_REPOS:
        store = os.path.join(workdir, "publisher", repo)
        mnt = os.path.join(root, repo)
        os.makedirs(store, exist_ok=True)
        os.makedirs(mnt, exist_ok=True)
        subprocess.run(["mount", "--bind", store, mnt], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", mnt], check=True)
        stores[repo] = store
    yield CvmfsTree(root, stores)
    for repo in THIN_REPOS:
        subprocess.run(["umount", "-l", os.path.join(root, repo)], check=False)


@pytest.fixture(scope="session")
def driver_proc(workdir, cvmfs):
    _need_docker()
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
    _need_docker()
    d = Dockerd(os.path.join(workdir, "dockerd-overlay2"), "overlay2").start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def registry(workdir):
    _need_docker()
    r = Registry(os.path.join(workdir, "registry")).start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def busybox(dockerd, workdir) -> str:
    return import_busybox(dockerd, workdir)
