"""Fixtures for the driver tests: a real Driver on a real directory with real overlay
mounts (root only), and the real plugin HTTP server on a unix socket."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Callable, Iterator, List

import pytest
from layer_tools import PluginClient, mounts_below

from cvmfs_graphdriver import mounts
from cvmfs_graphdriver.config import Config
from cvmfs_graphdriver.driver import Driver
from cvmfs_graphdriver.server import PluginServer
from cvmfs_graphdriver.sockets import bind_socket


@pytest.fixture
def home(as_root, tmp_path) -> str:
    return str(tmp_path / "home")


@pytest.fixture
def new_driver(as_root, tmp_path) -> Iterator[Callable[..., Driver]]:
    """Factory: an initialised Driver on `home` (default <tmp>/home); all are cleaned up
    and no mount may be left under the test's directory afterwards."""
    made: List[Driver] = []

    def make(home: str = "", **config) -> Driver:
        d = Driver(Config(**config))
        d.init(home or str(tmp_path / "home"), None, None, None)
        made.append(d)
        return d

    yield make
    for d in reversed(made):
        d.cleanup()
    leaked = mounts_below(str(tmp_path))
    for point in leaked:  # do not leave them to the next test, but fail this one
        mounts.unmount(point)
    assert leaked == [], f"mounts left behind: {leaked}"


@pytest.fixture
def drv(new_driver) -> Driver:
    return new_driver()


@pytest.fixture
def serve(as_root, tmp_path) -> Iterator[Callable[[Driver], str]]:
    """Start the plugin server for a Driver on a fresh unix socket; returns the socket path."""
    servers = []
    # unix socket paths are limited to 108 bytes: keep it short, outside tmp_path
    sockdir = tempfile.mkdtemp(prefix="cgd-", dir="/tmp")

    def start(driver: Driver) -> str:
        path = os.path.join(sockdir, f"p{len(servers)}.sock")
        srv = PluginServer(bind_socket(path), driver)
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True)
        t.start()
        servers.append((srv, t))
        return path

    yield start
    for srv, t in servers:
        srv.shutdown()
        srv.server_close()
        t.join(10)
    shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def plugin(serve, tmp_path) -> Iterator[PluginClient]:
    """A client connected to a served, not yet initialised driver (Init it like dockerd)."""
    d = Driver(Config())
    client = PluginClient(serve(d))
    yield client
    client.close()
    d.cleanup()
    leaked = mounts_below(str(tmp_path))
    for point in leaked:
        mounts.unmount(point)
    assert leaked == [], f"mounts left behind: {leaked}"
