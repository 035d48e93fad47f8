"""Fixtures of the fault tests (issue 11): the driver tests' fixtures (new_driver, drv,
serve, plugin: tests/driver/conftest.py, reused as they are) plus what injects faults:
small loop-mounted filesystems to fill, and FUSE mounts that refuse or never answer."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Iterator, List

import pytest

DRIVER_TESTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "driver")
sys.path.insert(0, DRIVER_TESTS)


def _driver_fixtures():  # the driver tests' conftest, under a name of its own
    spec = importlib.util.spec_from_file_location(
        "driver_tests_conftest", os.path.join(DRIVER_TESTS, "conftest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fx = _driver_fixtures()
home = _fx.home
new_driver = _fx.new_driver
drv = _fx.drv
serve = _fx.serve
plugin = _fx.plugin

from faultkit import FuseMount, detach_below  # noqa: E402
from harness import need  # noqa: E402
from layer_tools import PluginClient  # noqa: E402


@pytest.fixture
def inited(plugin, tmp_path) -> PluginClient:
    """A served driver, Activated and Initialised on <tmp>/home as dockerd does."""
    assert plugin.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    assert plugin.call("GraphDriver.Init", {"Home": str(tmp_path / "home"), "Opts": None,
                                            "UIDMaps": None, "GIDMaps": None}) == {}
    return plugin


@pytest.fixture
def loopfs(as_root) -> Iterator[Callable[..., str]]:
    """Factory: a fresh filesystem of `size_mb` on a loop device, mounted at a new
    directory (returned). Everything mounted below it, then it, then its loop device
    (mount -o loop sets autoclear) and image go afterwards, whatever the test did."""
    made: List[str] = []

    def make(fstype: str = "ext4", size_mb: int = 64) -> str:
        mkfs = shutil.which(f"mkfs.{fstype}")
        need(mkfs is not None, f"mkfs.{fstype} is not installed (scripts/setup.sh)")
        base = tempfile.mkdtemp(prefix="cgd-loop-", dir="/tmp")
        made.append(base)
        image, mnt = os.path.join(base, "img"), os.path.join(base, "mnt")
        os.mkdir(mnt)
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        subprocess.run([mkfs, "-q", image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, mnt], check=True, capture_output=True)
        return mnt

    yield make
    for base in made:
        mnt = os.path.join(base, "mnt")
        detach_below(mnt)
        if os.path.ismount(mnt):
            subprocess.run(["umount", mnt], check=False, capture_output=True)
            if os.path.ismount(mnt):
                subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        image = os.path.join(base, "img")
        out = subprocess.run(["losetup", "-j", image], capture_output=True, text=True).stdout
        for line in out.splitlines():  # autoclear did not (a lazy unmount still busy)
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fuse(as_root) -> Iterator[Callable[..., FuseMount]]:
    """Factory: a FUSE mount over a directory that refuses root (EACCES) or never
    answers (hangs); all released (a hung one answers ENOTCONN) and unmounted after."""
    need(os.path.exists("/dev/fuse"), "no /dev/fuse (the fuse kernel module)")
    made: List[FuseMount] = []

    def make(target: str, kind: str) -> FuseMount:
        m = FuseMount(target, kind)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        with contextlib.suppress(OSError):
            m.close()
