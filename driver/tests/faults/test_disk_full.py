"""Disk full (issue 11, faults a): the driver home on a small loop-mounted file system
that a layer, or a container's writes, fill up. Each time: a clear error that names the
layer and says the disk is full, no partial layer (not reported, nothing in .staging),
the space given back once dockerd removes the failed layer, committed layers intact,
and the driver still working (a small layer applies afterwards)."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from typing import IO, Iterator, List, Tuple

import pytest
from faultkit import BigTar, bytes_lost, contents, fill, fill_up, free_blocks
from harness import staging_left
from layer_tools import PluginClient, PluginError, TarBuilder, mounts_below, new_id

pytestmark = pytest.mark.root

SLACK_BLOCKS = 16  # "df before == df after, within a few blocks" (journal, directories)
SIZES = {"ext4": 64, "xfs": 300}  # MiB: mkfs.xfs makes nothing smaller than 300 MiB
# What a disk-full error says: ENOSPC itself, or the free space the layer would exceed
# (archive.apply_tar refuses an entry that cannot fit before writing it).
DISK_FULL = re.compile(r"disk full|free space|No space left", re.IGNORECASE)


def init_on(client: PluginClient, home: str) -> None:
    assert client.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    assert client.call("GraphDriver.Init", {"Home": home, "Opts": None, "UIDMaps": None,
                                            "GIDMaps": None}) == {}


def apply_stream(client: PluginClient, layer: str, parent: str, body: IO[bytes]) -> dict:
    """ApplyDiff with a chunked body read from `body` as it is sent (dockerd's way)."""
    def chunks() -> Iterator[bytes]:
        while True:
            data = body.read(1 << 18)
            if not data:
                return
            yield data

    client.conn.request("POST", f"/GraphDriver.ApplyDiff?id={layer}&parent={parent}",
                        body=chunks(), headers={"Content-Type": "application/x-tar"},
                        encode_chunked=True)
    return client._finish(client.conn.getresponse())


def base_layer(client: PluginClient) -> str:
    """A committed layer whose content must survive everything that follows."""
    layer = new_id()
    client.call("GraphDriver.Create", {"ID": layer})
    tar = TarBuilder().dir("etc").file("etc/base", os.urandom(300_000)) \
        .file("bin/tool", os.urandom(200_000), mode=0o755).bytes()
    client.apply_diff(layer, "", tar)
    return layer


def layer_count(client: PluginClient) -> int:
    rows = dict(client.call("GraphDriver.Status")["Status"])
    return int(rows["Layers"])


def assert_cleanly_failed(client: PluginClient, home: str, layer: str, layers: int) -> None:
    """The failed layer is not reported; dockerd's Remove then takes it all away."""
    assert client.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
    assert layer_count(client) == layers
    assert client.call("GraphDriver.Remove", {"ID": layer}) == {}
    assert staging_left(home) == []
    assert not os.path.lexists(os.path.join(home, layer))


def assert_still_works(client: PluginClient, parent: str) -> None:
    layer = new_id()
    client.call("GraphDriver.Create", {"ID": layer, "Parent": parent})
    assert client.apply_diff(layer, parent, TarBuilder().file("ok", b"ok").bytes()) \
        == {"Size": 2}
    assert client.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": True}
    assert client.call("GraphDriver.Remove", {"ID": layer}) == {}


def assert_recovered(client: PluginClient, tally, mnt: str, free: int, home: str,
                     base: str, kept) -> None:
    """After a failed layer is gone: the space is back, the base layer's bytes are all
    there, the driver still works, no mount is left; the fault is tallied."""
    returned = free_blocks(mnt)
    assert abs(returned - free) <= SLACK_BLOCKS, (free, returned)
    lost = bytes_lost(kept, os.path.join(home, base, "diff"))
    tally.lost(lost)
    assert lost == 0
    assert_still_works(client, base)
    leaks = len(mounts_below(mnt))
    tally.leaks(leaks)
    tally.fault(survived=lost == 0 and leaks == 0)
    assert leaks == 0


def reconnect(client: PluginClient) -> None:
    """A failed streamed call may close the connection (its body unread): dockerd
    opens a new one, so does this client."""
    client.conn.close()


class FillingMeanwhile(io.RawIOBase):
    """A layer body that, once half of it is sent, has the disk filled by someone else
    (another container writing): the layer's own writes then meet ENOSPC for real."""

    def __init__(self, body: IO[bytes], after: int, filler: str) -> None:
        self.body, self.after, self.filler, self.sent = body, after, filler, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.sent >= self.after and not os.path.isdir(self.filler):
            os.mkdir(self.filler)
            fill(self.filler)
        data = self.body.read(len(b))
        b[:len(data)] = data
        self.sent += len(data)
        return len(data)


@pytest.mark.parametrize("how", ["too-big", "filled-meanwhile"])
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_disk_full_during_apply_diff(loopfs, plugin, fstype, how, tally):
    mnt = loopfs(fstype, SIZES[fstype])
    home = os.path.join(mnt, "home")
    init_on(plugin, home)
    base = base_layer(plugin)
    kept = contents(os.path.join(home, base, "diff"))
    free = free_blocks(mnt)
    room = free * os.statvfs(mnt).f_frsize

    layer = new_id()
    plugin.call("GraphDriver.Create", {"ID": layer, "Parent": base})
    filler = os.path.join(mnt, "other-writer")
    if how == "too-big":
        body: IO[bytes] = BigTar({"etc/": 0, "big/a": room // 2 + (8 << 20),
                                  "big/b": room // 2 + (8 << 20)})
    else:  # fits when it begins, not once the disk is filled half-way through
        body = FillingMeanwhile(BigTar({"etc/": 0, "big/a": room // 4, "big/b": room // 4}),
                                room // 8, filler)
    start = time.monotonic()
    with pytest.raises(PluginError) as failed:
        apply_stream(plugin, layer, base, body)
    took = time.monotonic() - start
    reconnect(plugin)
    message = failed.value.message
    assert layer in message and DISK_FULL.search(message), message
    assert failed.value.status == 200  # a driver error, as dockerd expects them

    assert_cleanly_failed(plugin, home, layer, layers=1)
    shutil.rmtree(filler, ignore_errors=True)
    assert_recovered(plugin, tally, mnt, free, home, base, kept)
    assert took < 60


def test_disk_full_during_a_build(loopfs, plugin, tally):
    """`docker build`/`docker commit` on a full disk: a container writes until ENOSPC,
    then its layer is committed (Diff, then Create + ApplyDiff of that diff), which
    cannot fit: it fails cleanly and everything is removable."""
    mnt = loopfs("ext4", 64)
    home = os.path.join(mnt, "home")
    init_on(plugin, home)
    base = base_layer(plugin)
    kept = contents(os.path.join(home, base, "diff"))
    free = free_blocks(mnt)

    container = new_id()
    plugin.call("GraphDriver.CreateReadWrite", {"ID": container, "Parent": base})
    view = plugin.call("GraphDriver.Get", {"ID": container, "MountLabel": ""})["Dir"]
    os.makedirs(os.path.join(view, "out"))
    written = fill(os.path.join(view, "out"))
    assert written > 16 << 20
    plugin.call("GraphDriver.Put", {"ID": container})

    tar, _ = plugin.diff(container, base)  # reading needs no space
    assert len(tar) > written

    committed = new_id()
    try:
        plugin.call("GraphDriver.Create", {"ID": committed, "Parent": base})
    except PluginError as e:  # no room even for the layer's directories
        message = e.message
    else:
        with pytest.raises(PluginError) as failed:
            apply_stream(plugin, committed, base, io.BytesIO(tar))
        reconnect(plugin)
        message = failed.value.message
    assert committed in message and DISK_FULL.search(message), message

    assert_cleanly_failed(plugin, home, committed, layers=2)  # base and the container
    assert plugin.call("GraphDriver.Remove", {"ID": container}) == {}
    assert staging_left(home) == []
    assert_recovered(plugin, tally, mnt, free, home, base, kept)


def create_on_a_full_disk(loopfs, plugin) -> Tuple[str, str, List[Tuple[str, PluginError]]]:
    """Fill the disk until not even a layer's directories fit, then Create and
    CreateReadWrite: (mount, home, [(layer, error)])."""
    mnt = loopfs("ext4", 64)
    home = os.path.join(mnt, "home")
    init_on(plugin, home)
    filler = os.path.join(mnt, "other-writer")
    os.mkdir(filler)
    fill(filler)
    fill_up(filler)  # the last blocks too: no directory fits any more
    failures = []
    for method in ("GraphDriver.Create", "GraphDriver.CreateReadWrite"):
        layer = new_id()
        with pytest.raises(PluginError) as failed:
            plugin.call(method, {"ID": layer})
        failures.append((layer, failed.value))
    return mnt, home, failures


def test_create_on_a_full_disk_leaves_nothing(loopfs, plugin, tally):
    """Not even a layer's directories fit: Create fails and leaves nothing behind."""
    mnt = loopfs("ext4", 64)
    home = os.path.join(mnt, "home")
    init_on(plugin, home)
    base = base_layer(plugin)
    kept = contents(os.path.join(home, base, "diff"))
    free = free_blocks(mnt)
    filler = os.path.join(mnt, "other-writer")
    os.mkdir(filler)
    fill(filler)
    fill_up(filler)
    for method in ("GraphDriver.Create", "GraphDriver.CreateReadWrite"):
        layer = new_id()
        with pytest.raises(PluginError):
            plugin.call(method, {"ID": layer, "Parent": base})
        assert plugin.call("GraphDriver.Exists", {"ID": layer}) == {"Exists": False}
        assert plugin.call("GraphDriver.Remove", {"ID": layer}) == {}
        assert not os.path.lexists(os.path.join(home, layer))
    assert staging_left(home) == []
    assert layer_count(plugin) == 1
    shutil.rmtree(filler)
    assert abs(free_blocks(mnt) - free) <= SLACK_BLOCKS
    lost = bytes_lost(kept, os.path.join(home, base, "diff"))
    tally.lost(lost)
    assert_still_works(plugin, base)
    leaks = len(mounts_below(mnt))
    tally.leaks(leaks)
    tally.fault(survived=lost == 0 and leaks == 0)
    assert lost == 0 and leaks == 0


def test_create_on_a_full_disk_is_a_driver_error_naming_the_layer_and_disk_full(
        loopfs, plugin):
    _, _, failures = create_on_a_full_disk(loopfs, plugin)
    for layer, error in failures:
        assert error.status == 200, error.message  # an error for dockerd, not a 500
        assert layer in error.message and DISK_FULL.search(error.message), error.message


def test_snapshotter_prepare_write_until_full_commit(loopfs, tally):
    """The snapshotter's home on a small file system: a container (Prepare) writes until
    ENOSPC, then Commit (its metadata, sqlite's WAL, needs a little room too) and Remove.
    Whichever way Commit goes, it goes all the way or not at all, the snapshot can be
    removed, the space comes back and a committed snapshot is intact.

    It was: Commit failed with sqlite3.OperationalError 'database or disk is full', which
    named no snapshot, and Remove of the still active snapshot failed the same way (its
    metadata went first, and the WAL could not grow), so the space stayed taken."""
    from cvmfs_graphdriver.snapshotter.errdefs import ResourceExhausted, SnapshotterError
    from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

    mnt = loopfs("ext4", 64)
    sn = OverlaySnapshotter(os.path.join(mnt, "sn"))
    try:
        def sid(key: str) -> str:
            with sn.ms.transaction() as tx:
                return tx.get_info(key)[0]

        sn.prepare("base-k", "")
        with open(os.path.join(sn.layout.fs(sid("base-k")), "kept"), "wb") as f:
            f.write(os.urandom(100_000))
        sn.commit("base", "base-k")
        base_fs = sn.layout.fs(sid("base"))
        kept = contents(base_fs)
        free = free_blocks(mnt)

        sn.prepare("k", "base")
        written = fill(sn.layout.fs(sid("k")))  # as the container's upper directory
        fill_up(sn.layout.fs(sid("k")))
        assert written > 16 << 20
        try:
            sn.commit("c", "k")
            name = "c"
        except SnapshotterError as e:  # full: nothing half-done
            assert "full" in str(e) or "space" in str(e), e
            # a containerd error: the snapshot named, the disk said full, its own code
            assert isinstance(e, ResourceExhausted), repr(e)
            assert "failed to commit snapshot k" in str(e) and "disk full" in str(e), e
            name = "k"
        assert {i.name for i in sn.walk()} == {"base", name}
        sn.remove(name)
        assert {i.name for i in sn.walk()} == {"base"}
        assert os.listdir(sn.layout.staging) == []
        returned = free_blocks(mnt)
        assert abs(returned - free) <= SLACK_BLOCKS * 4, (free, returned)  # + sqlite's WAL
        lost = bytes_lost(kept, base_fs)
        tally.lost(lost)
        assert sn.prepare("after", "base")  # still works
        tally.fault(survived=lost == 0)
        assert lost == 0
    finally:
        sn.close()
