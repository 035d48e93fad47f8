"""Remove: a container's layer leaves the home in the call, its files are freed just after
(reaper.py); an image layer's files are freed in the call. Whatever needs the space or
the staging area waits for the freeing."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Iterator, Tuple

import pytest
from layer_tools import TarBuilder, make_layer, new_id

from cvmfs_graphdriver import reaper

pytestmark = pytest.mark.root

BIG = 4 << 20


@pytest.fixture
def held(monkeypatch) -> Iterator[Tuple[threading.Event, threading.Event]]:
    """The reaper's removals wait until `release` is set; `started` is set when the first
    one begins (in the reaper's thread, never in the caller's)."""
    started, release = threading.Event(), threading.Event()
    real = reaper.remove_tree

    def slow(path: str) -> None:
        assert threading.current_thread() is not threading.main_thread()
        started.set()
        assert release.wait(60), "the test never released the reaper"
        real(path)

    monkeypatch.setattr(reaper, "remove_tree", slow)
    yield started, release
    release.set()


def _container(drv) -> Tuple[str, str]:
    """An image layer and a container layer on it that wrote a file."""
    base = make_layer(drv, data=TarBuilder().file("etc/hostname", b"h").bytes())
    ctr = make_layer(drv, base, rw=True)
    with open(os.path.join(drv.get(ctr), "written"), "wb") as f:
        f.write(b"\0" * BIG)
    drv.put(ctr)
    return base, ctr


def test_a_containers_layer_is_gone_when_remove_returns_and_its_files_go_after(drv, held):
    started, release = held
    base, ctr = _container(drv)
    drv.remove(ctr)
    assert not drv.exists(ctr)
    assert not os.path.lexists(drv.layout.dir(ctr))
    assert started.wait(10), "nothing was handed to the reaper"
    (left,) = os.listdir(drv.layout.staging)
    assert left.startswith(f"{ctr}.removing.")
    assert os.path.getsize(os.path.join(drv.layout.staging, left, "diff", "written")) == BIG
    release.set()
    drv.wait_for_removals()
    assert os.listdir(drv.layout.staging) == []
    assert drv.exists(base)


def test_an_image_layers_files_are_freed_in_the_call(drv, held):
    started, _ = held
    layer = make_layer(drv, data=TarBuilder().file("big", b"\0" * BIG).bytes())
    drv.remove(layer)
    assert not started.is_set()
    assert os.listdir(drv.layout.staging) == []


def _apply(drv) -> None:
    make_layer(drv, data=TarBuilder().file("f", b"x").bytes())


def _cleanup(drv) -> None:
    drv.cleanup()


def _init(drv) -> None:
    drv.init(drv.layout.home, None, None, None)


@pytest.mark.parametrize("call", [_apply, _cleanup, _init],
                         ids=["apply_diff", "cleanup", "init"])
def test_calls_that_need_the_space_or_the_staging_area_wait_for_the_files(
        drv, held, call: Callable):
    started, release = held
    _, ctr = _container(drv)
    drv.remove(ctr)
    assert started.wait(10)
    done = threading.Event()
    t = threading.Thread(target=lambda: (call(drv), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.5), "the call did not wait for the removed container's files"
    release.set()
    t.join(30)
    assert done.is_set()
    assert os.listdir(drv.layout.staging) == []


def test_a_failed_freeing_is_logged_and_the_next_start_finishes_it(
        new_driver, monkeypatch, caplog):
    drv = new_driver()
    _, ctr = _container(drv)

    def broken(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(reaper, "remove_tree", broken)
    with caplog.at_level(logging.WARNING, logger="cvmfs_graphdriver.reaper"):
        drv.remove(ctr)
        drv.wait_for_removals()
    assert "the files of a removed layer" in caplog.text
    assert "the driver's next start removes them" in caplog.text
    assert len(os.listdir(drv.layout.staging)) == 1
    monkeypatch.undo()
    again = new_driver()
    assert os.listdir(again.layout.staging) == []


def test_many_removals_at_once_all_complete(drv):
    base = make_layer(drv, data=TarBuilder().file("f", b"x").bytes())
    ctrs = [make_layer(drv, base, rw=True) for _ in range(20)]
    threads = [threading.Thread(target=drv.remove, args=(c,)) for c in ctrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    drv.wait_for_removals()
    assert not any(drv.exists(c) for c in ctrs)
    assert os.listdir(drv.layout.staging) == []
    assert drv.exists(base)
    assert not drv.exists(new_id())


def test_wait_is_not_held_up_by_trees_given_after_it(monkeypatch, tmp_path):
    gates = {str(tmp_path / n): threading.Event() for n in ("a", "b")}
    monkeypatch.setattr(reaper, "remove_tree", lambda path: gates[path].wait(30))
    r = reaper.Reaper()
    a, b = gates
    r.submit(a)
    done = threading.Event()
    threading.Thread(target=lambda: (r.wait(), done.set()), daemon=True).start()
    deadline = time.monotonic() + 10
    while not r._cond._waiters:  # type: ignore[attr-defined] # the waiter is in wait()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r.submit(b)  # given after the wait began: a steady stream must not starve it
    gates[a].set()
    assert done.wait(10), "wait() waited for a tree given after it was called"
    gates[b].set()
    r.wait()


def test_without_a_thread_the_tree_is_removed_in_the_call(monkeypatch, tmp_path):
    def no_thread(self) -> None:
        raise MemoryError("no thread")

    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    r = reaper.Reaper()
    r.submit(str(tree))
    assert not tree.exists()
    monkeypatch.undo()
    (tree / "sub").mkdir(parents=True)
    r.submit(str(tree))  # and a later one has its thread: nothing was left claimed
    r.wait()
    assert not tree.exists()
