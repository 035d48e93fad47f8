"""Regression (found by test_graphdriver_kill.py, pull #0 of the default seed): a Create
whose answer never reaches dockerd leaves a layer that no image of dockerd uses.

The driver is killed after Driver.create has renamed the layer into the home but before
its 200 is written (the window is what follows the rename: the layer symlink and
fsync_dir(home)). dockerd's plugin client sees EOF and retries
the call, re-reading the bytes.Buffer the first try already drained (moby
pkg/plugins/client.go callWithRetry, moby/moby#33412): the retry is a Create with an
empty body, refused as "invalid layer id ''". registerWithDescriptor returns the error
without a Remove (moby only cleans up after a Create that succeeded), the pull fails, the
layer stays in the driver home, unknown to dockerd's layerdb. overlay2 never leaks so:
its Create runs in dockerd and removes its directory itself when it fails.

A layer made by Create (read-only: dockerd always follows it with ApplyDiff before it
records anything) that never had a complete ApplyDiff nor a child is no layer of dockerd:
the restarted driver's recovery must remove it, as it removes an interrupted ApplyDiff.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import pytest
from layer_tools import PluginClient, PluginError


def _new_id() -> str:
    return uuid.uuid4().hex * 2


def _init(c: PluginClient, home: str) -> None:
    c.call("GraphDriver.Init", {"Home": home, "Opts": [], "UIDMaps": [], "GIDMaps": []})


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        data = b"hello\n"
        info = tarfile.TarInfo("hello")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _dockerd_retry(c: PluginClient, method: str) -> PluginError:
    """What dockerd's plugin client sends when it retries a call: the same URL, the
    drained buffer as the body (Content-Length: 0)."""
    c.conn.request("POST", f"/{method}", body=b"",
                   headers={"Accept": PluginClient.ACCEPT, "Content-Type": "application/json",
                            "Content-Length": "0"})
    with pytest.raises(PluginError) as e:
        c._finish(c.conn.getresponse())
    return e.value


def test_a_create_whose_answer_was_lost_is_removed_by_recovery(driver):
    drv, home = driver
    c = PluginClient(drv.socket)
    _init(c, home)
    lost = _new_id()
    c.call("GraphDriver.Create", {"ID": lost, "Parent": ""})  # done; its answer is "lost"
    c.close()
    drv.kill9()
    drv.start()
    c = PluginClient(drv.socket)
    _dockerd_retry(c, "GraphDriver.Create")  # refused: dockerd gives up, the pull fails
    c.close()
    assert not os.path.exists(os.path.join(home, lost)), \
        f"layer {lost} of a Create dockerd saw fail is left in the home"


def test_created_layers_in_use_survive_recovery(driver):
    """What the fix must keep: a layer made complete by ApplyDiff, a Create'd layer never
    applied but with a child (used: a client may stack layers without applying the lower
    one), a CreateReadWrite layer (a `docker create`d container's: no ApplyDiff follows)."""
    drv, home = driver
    c = PluginClient(drv.socket)
    _init(c, home)
    applied, base, child, rw = (_new_id() for _ in range(4))
    c.call("GraphDriver.Create", {"ID": applied, "Parent": ""})
    c.apply_diff(applied, "", _tar())
    c.call("GraphDriver.Create", {"ID": base, "Parent": ""})
    c.call("GraphDriver.Create", {"ID": child, "Parent": base})
    c.apply_diff(child, base, _tar())
    c.call("GraphDriver.CreateReadWrite", {"ID": rw, "Parent": applied})
    c.close()
    drv.kill9()
    drv.start()
    c = PluginClient(drv.socket)
    for layer in (applied, base, child, rw):
        assert c.call("GraphDriver.Exists", {"ID": layer})["Exists"] is True, layer
    c.close()


def test_an_init_layer_whose_put_answer_was_lost_is_removed_by_recovery(driver):
    """Found by test_graphdriver_kill.py (run #0): `docker run` failed with
    "GraphDriver.Put: invalid layer id ''" and left "<id>-init" mounted in the home."""
    drv, home = driver
    c = PluginClient(drv.socket)
    _init(c, home)
    base, container = _new_id(), _new_id()
    init = f"{container}-init"
    c.call("GraphDriver.Create", {"ID": base, "Parent": ""})
    c.apply_diff(base, "", _tar())
    c.call("GraphDriver.CreateReadWrite", {"ID": init, "Parent": base})
    merged = c.call("GraphDriver.Get", {"ID": init, "MountLabel": ""})["Dir"]
    c.close()
    drv.kill9()  # during the Put(init): its answer is lost
    drv.start()
    c = PluginClient(drv.socket)
    _dockerd_retry(c, "GraphDriver.Put")  # refused: dockerd's CreateRWLayer fails
    c.close()
    leftover = [p for p in (merged, os.path.join(home, init)) if os.path.exists(p)]
    assert not leftover, f"the init layer of a failed docker run is left: {leftover}"


def test_an_init_layer_with_its_container_layer_survives_recovery(driver):
    drv, home = driver
    c = PluginClient(drv.socket)
    _init(c, home)
    base, container = _new_id(), _new_id()
    init = f"{container}-init"
    c.call("GraphDriver.Create", {"ID": base, "Parent": ""})
    c.apply_diff(base, "", _tar())
    c.call("GraphDriver.CreateReadWrite", {"ID": init, "Parent": base})
    c.call("GraphDriver.CreateReadWrite", {"ID": container, "Parent": init})
    merged = c.call("GraphDriver.Get", {"ID": container, "MountLabel": ""})["Dir"]
    c.close()
    drv.kill9()
    drv.start()
    c = PluginClient(drv.socket)
    for layer in (init, container):
        assert c.call("GraphDriver.Exists", {"ID": layer})["Exists"] is True, layer
    c.call("GraphDriver.Put", {"ID": container})
    assert not os.path.ismount(merged)
    c.close()
