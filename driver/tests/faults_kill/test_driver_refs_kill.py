"""Regression (found by test_graphdriver_kill.py): the references dockerd holds on a
mounted layer across a kill -9 of the driver.

dockerd Gets a running container's layer once at its start and once more for each
transient user (`docker commit`, `docker cp`, `docker export`), each Get paired with a Put.
When the driver is killed between a transient Get and its Put, the restarted driver adopts
the mount with a reference count of 1 (Driver._recover_layer); the transient Put then
unmounts the root of a container that still runs: `docker commit` interrupted by a kill
leaves the container's merged dir unmounted in the host, and its `docker stop` Puts a
layer that is no longer mounted.
"""

from __future__ import annotations

import uuid

from layer_tools import PluginClient

from cvmfs_graphdriver import mounts


def _layers(c: PluginClient, home: str):
    c.call("GraphDriver.Init", {"Home": home, "Opts": [], "UIDMaps": [], "GIDMaps": []})
    base, init, rw = (uuid.uuid4().hex * 2 for _ in range(3))
    c.call("GraphDriver.Create", {"ID": base, "Parent": ""})
    c.call("GraphDriver.Create", {"ID": init, "Parent": base})
    c.call("GraphDriver.CreateReadWrite", {"ID": rw, "Parent": init})
    return rw


def test_a_transient_put_after_a_kill_keeps_the_running_containers_mount(driver):
    drv, home = driver
    c = PluginClient(drv.socket)
    rw = _layers(c, home)
    merged = c.call("GraphDriver.Get", {"ID": rw, "MountLabel": ""})["Dir"]  # the container
    assert c.call("GraphDriver.Get", {"ID": rw, "MountLabel": ""})["Dir"] == merged  # commit
    c.close()

    drv.kill9()
    drv.start()  # restores the home, adopts the mount

    c = PluginClient(drv.socket)
    c.call("GraphDriver.Put", {"ID": rw})  # the commit's release, after the restart
    assert mounts.is_mountpoint(merged), "the running container's root was unmounted"
    c.call("GraphDriver.Put", {"ID": rw})  # the container stops
    assert not mounts.is_mountpoint(merged)
    c.close()


def test_adopted_mount_with_one_reference_is_released_by_one_put(driver):
    """The case adoption gets right today (and must keep): only the container's Get."""
    drv, home = driver
    c = PluginClient(drv.socket)
    rw = _layers(c, home)
    merged = c.call("GraphDriver.Get", {"ID": rw, "MountLabel": ""})["Dir"]
    c.close()
    drv.kill9()
    drv.start()
    c = PluginClient(drv.socket)
    assert mounts.is_mountpoint(merged)
    c.call("GraphDriver.Put", {"ID": rw})
    assert not mounts.is_mountpoint(merged)
    c.close()
