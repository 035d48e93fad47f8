"""A restarted driver makes its home consistent: interrupted layers go, mounts in use stay
and are adopted, short links are repaired."""

from __future__ import annotations

import io
import json
import os

import pytest
from layer_tools import TarBuilder, make_layer, mounts_below

from cvmfs_graphdriver import driver as driver_module
from cvmfs_graphdriver.config import Config
from cvmfs_graphdriver.driver import Driver
from cvmfs_graphdriver.errors import DriverError, NotFoundError

pytestmark = pytest.mark.root

BASE_TAR = TarBuilder().dir("etc").file("etc/os-release", b"ID=test\n").bytes()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mounts_below(os.path.dirname(os.path.dirname(path)))


class _Dropped(io.RawIOBase):
    """A request body whose client goes away after some bytes."""

    def __init__(self, data: bytes, cut: int) -> None:
        self._data, self._cut, self._pos = data, cut, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos >= self._cut:
            raise ConnectionResetError("client went away")
        n = min(len(b), self._cut - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def test_interrupted_apply_diff_is_not_a_layer_and_goes_at_the_next_init(new_driver):
    d1 = new_driver()
    base = make_layer(d1, data=BASE_TAR)
    home = d1.layout.home

    # 1: the client went away in the middle of the body
    dropped = make_layer(d1, base)
    big = TarBuilder().file("a", os.urandom(300_000)).file("b", os.urandom(300_000)).bytes()
    with pytest.raises(DriverError) as e:
        d1.apply_diff(dropped, base, io.BufferedReader(_Dropped(big, 400_000)))
    assert dropped in str(e.value)
    # 2: the daemon died during ApplyDiff (marker and a partial file left behind)
    crashed = make_layer(d1, base)
    with open(os.path.join(home, crashed, ".applying"), "w"):
        pass
    with open(os.path.join(home, crashed, "diff", "partial"), "wb") as f:
        f.write(b"half")

    shorts = {}
    for layer in (dropped, crashed):
        shorts[layer] = _read(os.path.join(home, layer, "link"))
        assert not d1.exists(layer)
        with pytest.raises(NotFoundError) as e:
            d1.get(layer)
        assert "incomplete" in str(e.value) and layer in str(e.value)

    d2 = new_driver()
    for layer in (dropped, crashed):
        assert not os.path.lexists(os.path.join(home, layer))
        assert not os.path.lexists(os.path.join(home, "l", shorts[layer]))
        assert not d2.exists(layer)
    assert d2.exists(base)
    assert os.listdir(d2.layout.staging) == []
    # dockerd pulls the layer again under the same id
    make_layer(d2, base, TarBuilder().file("again", b"ok").bytes(), layer=crashed)
    assert sorted(os.listdir(d2.get(crashed))) == ["again", "etc"]
    d2.put(crashed)


def test_leftovers_of_interrupted_create_and_remove_are_cleared(new_driver):
    d1 = new_driver()
    base = make_layer(d1, data=BASE_TAR)
    staging = d1.layout.staging
    for name in (f"{base}x.ABCDEFGH", "deadbeef.removing.ABCDEFGH"):
        os.makedirs(os.path.join(staging, name, "diff", "sub"))
        with open(os.path.join(staging, name, "diff", "sub", "f"), "w") as f:
            f.write("left over")
    new_driver()
    assert os.listdir(staging) == []
    assert d1.exists(base)


def test_mount_left_by_a_previous_run_stays_and_is_adopted(new_driver):
    d1 = new_driver()
    base = make_layer(d1, data=BASE_TAR)
    container = make_layer(d1, base, rw=True)
    view = d1.get(container)
    with open(os.path.join(view, "running"), "w") as f:
        f.write("yes")

    d2 = new_driver()  # the daemon restarted without Cleanup (killed, upgraded)
    assert _is_mounted(view), "a driver restart must not unmount a running container"
    assert dict(d2.status())["Mounted Layers"] == "1"
    assert d2.get(container) == view  # dockerd may Get it again ...
    d2.put(container)
    assert _is_mounted(view)
    d2.put(container)  # ... and its final Put releases the adopted mount
    assert not _is_mounted(view)
    assert _read(os.path.join(d2.layout.home, container, "diff", "running")) == "yes"


def test_adopted_mount_is_released_by_a_single_put(new_driver):
    d1 = new_driver()
    base = make_layer(d1, data=BASE_TAR)
    container = make_layer(d1, base, rw=True)
    view = d1.get(container)
    d2 = new_driver()
    assert _is_mounted(view)
    d2.put(container)  # the container stops: the Put of the Get made before the restart
    assert not _is_mounted(view)


def test_dangling_links_go_and_missing_links_come_back(new_driver):
    d1 = new_driver()
    base = make_layer(d1, data=BASE_TAR)
    child = make_layer(d1, base, TarBuilder().file("child", b"c").bytes())
    links = d1.layout.links
    base_short = _read(os.path.join(d1.layout.home, base, "link"))
    os.unlink(os.path.join(links, base_short))
    os.symlink("../0123456789abcdef/diff", os.path.join(links, "DANGLINGLINKTOANOLDLAYERXX"))
    with pytest.raises(DriverError):
        d1.get(child)  # its lower is gone: the mount fails (and says so)

    d2 = new_driver()
    assert not os.path.lexists(os.path.join(links, "DANGLINGLINKTOANOLDLAYERXX"))
    assert os.readlink(os.path.join(links, base_short)) == f"../{base}/diff"
    view = d2.get(child)
    assert sorted(os.listdir(view)) == ["child", "etc"]
    d2.put(child)


def test_home_reached_through_a_symlink(new_driver, tmp_path):
    """An admin may put the driver home elsewhere (local scratch) behind a symlink: Cleanup
    and adoption must still find the mounts (mountinfo shows the real path)."""
    real = tmp_path / "scratch" / "cvmfs-layers"
    real.mkdir(parents=True)
    link = tmp_path / "data-root-cvmfs"
    link.symlink_to(real)
    d1 = new_driver(str(link))
    base = make_layer(d1, data=BASE_TAR)
    kids = [make_layer(d1, base, rw=True) for _ in range(2)]
    views = [d1.get(k) for k in kids]
    assert len(mounts_below(str(real))) == 2

    d2 = new_driver(str(link))  # restart: both mounts are adopted
    d2.put(kids[0])
    assert mounts_below(str(real)) == [os.path.realpath(views[1])]
    d2.cleanup()  # dockerd shuts down
    assert mounts_below(str(real)) == []


def test_dockerd_restart_cleanup_then_init_again_on_the_same_driver(new_driver):
    d = new_driver()
    base = make_layer(d, data=BASE_TAR)
    child = make_layer(d, base, rw=True)
    view = d.get(child)
    d.cleanup()  # dockerd stops
    assert not _is_mounted(view)
    d.init(d.layout.home, None, None, None)  # dockerd starts again; the driver kept running
    assert d.exists(base) and d.exists(child)
    assert d.get(child) == view and _is_mounted(view)
    d.put(child)
    assert not _is_mounted(view)


def _state(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_the_state_file_is_written_only_when_a_mount_gains_a_second_user(new_driver, tmp_path,
                                                                         monkeypatch):
    """A container's start and stop (one Get, one Put) write nothing: its one reference
    is what recovery gives a mounted layer anyway. A second user (a `docker commit` of the
    running container) is written, and its release too; a restarted driver then needs
    two Puts to unmount."""
    state_file = str(tmp_path / "run" / "state.json")
    d1 = new_driver()
    base = make_layer(d1, data=BASE_TAR)
    container = make_layer(d1, base, rw=True)
    d1.cleanup()

    writes = []
    real_write = driver_module.atomic_write
    monkeypatch.setattr(driver_module, "atomic_write",
                        lambda path, *a, **k: (writes.append(path), real_write(path, *a, **k)))
    d = Driver(Config(), state_file=state_file)
    d.init(str(tmp_path / "home"), None, None, None)
    assert _state(state_file) == {"Home": d.layout.home, "Refs": {}}
    assert writes == [state_file]

    view = d.get(container)
    d.put(container)
    assert writes == [state_file], "a start and stop wrote the state file"

    assert d.get(container) == view
    assert d.get(container) == view  # the commit's
    assert writes == [state_file] * 2
    assert _state(state_file)["Refs"] == {container: 2}

    d2 = Driver(Config(), state_file=state_file)  # the driver restarted, the mount stays
    assert d2.restore()
    d2.put(container)  # the commit's Put
    assert _is_mounted(view), "a Put of the commit unmounted the running container"
    assert _state(state_file)["Refs"] == {}
    d2.put(container)  # the container stops
    assert not _is_mounted(view)
    d2.cleanup()


def test_a_state_file_write_that_failed_is_tried_again(new_driver, tmp_path, monkeypatch):
    state_file = str(tmp_path / "state.json")
    d1 = new_driver()
    container = make_layer(d1, make_layer(d1, data=BASE_TAR), rw=True)
    d1.cleanup()
    d = Driver(Config(), state_file=state_file)
    d.init(str(tmp_path / "home"), None, None, None)
    real_write = driver_module.atomic_write
    fail = [True]

    def write(path, *a, **k):
        if fail.pop():
            raise OSError(28, "No space left on device")
        real_write(path, *a, **k)

    monkeypatch.setattr(driver_module, "atomic_write", write)
    d.get(container)
    d.get(container)  # count 2: the write fails (logged)
    assert _state(state_file)["Refs"] == {}
    fail.append(False)
    d.get(container)  # count 3
    assert _state(state_file)["Refs"] == {container: 3}
    for _ in range(3):
        fail.append(False)
        d.put(container)
    assert _state(state_file)["Refs"] == {}
    assert not _is_mounted(os.path.join(d.layout.home, container, "merged"))
    d.cleanup()


def test_init_writes_the_state_file_again_even_when_nothing_changed(new_driver, tmp_path):
    state_file = str(tmp_path / "state.json")
    d = Driver(Config(), state_file=state_file)
    d.init(str(tmp_path / "home"), None, None, None)
    os.unlink(state_file)  # as a reboot takes /run
    d.init(str(tmp_path / "home"), None, None, None)  # dockerd started again
    assert _state(state_file) == {"Home": d.layout.home, "Refs": {}}
    d.cleanup()
