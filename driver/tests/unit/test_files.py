"""The durable-write helpers (files.py)."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

import pytest

from cvmfs_graphdriver import files
from cvmfs_graphdriver.files import atomic_write


def test_atomic_writes_racing_on_one_path_all_succeed(tmp_path):
    """Two images sharing a CVMFS layer start at once: both write its marker cache entry."""
    path = str(tmp_path / "entry.json")
    errors = []

    def write(i: int) -> None:
        try:
            for _ in range(200):
                atomic_write(path, f"writer {i}\n")
        except OSError as e:  # pragma: no cover - what the shared temp name caused
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with open(path) as f:
        assert f.read().startswith("writer ")
    assert os.listdir(tmp_path) == ["entry.json"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_write_all_durably_writes_and_fsyncs_every_file_after_starting_all(tmp_path,
                                                                            monkeypatch):
    """Each file gets its content and its own fsync (what makes it durable); the writeback
    of all of them is started before the first fsync, which is what lets the filesystem
    commit them together."""
    events = []
    monkeypatch.setattr(files, "_start_writeback", lambda fd: events.append(("start", fd)))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd)),
                                                 real_fsync(fd))[1])
    (tmp_path / "b").write_text("a longer old content")  # truncated, not overwritten
    paths = [str(tmp_path / name) for name in ("a", "b", "c")]
    fds = _open_fds()
    files.write_all_durably([(paths[0], "one"), (paths[1], "two"), (paths[2], "")])
    assert [Path(p).read_text() for p in paths] == ["one", "two", ""]
    assert [kind for kind, _ in events] == ["start"] * 3 + ["fsync"] * 3
    assert len({fd for _, fd in events}) == 3
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(p).st_mode & 0o777 for p in paths} == {0o666 & ~umask}
    assert _open_fds() == fds


def test_write_all_durably_failing_midway_closes_what_it_opened(tmp_path):
    fds = _open_fds()
    with pytest.raises(FileNotFoundError):
        files.write_all_durably([(str(tmp_path / "a"), "x"),
                                 (str(tmp_path / "missing" / "b"), "y")])
    assert _open_fds() == fds


def test_the_writeback_hint_is_the_kernels_own_call():
    """Not a stub: on this (Linux, glibc) machine sync_file_range is bound, and it answers
    a file descriptor as the kernel does."""
    assert files._sync_file_range is not None
    r, w = os.pipe()
    try:
        assert files._sync_file_range(r, 0, 0, files.SYNC_FILE_RANGE_WRITE) == -1
        assert ctypes.get_errno() == errno.ESPIPE  # a pipe has no pages to write
    finally:
        os.close(r)
        os.close(w)


def test_write_all_durably_closes_every_file_when_a_flush_fails(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    fds = _open_fds()
    with pytest.raises(OSError, match="Input/output"):
        files.write_all_durably([(str(tmp_path / name), "x") for name in "abc"])
    assert _open_fds() == fds


def test_one_file_is_flushed_without_the_writeback_hint(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(files, "_start_writeback", started.append)
    files.write_durably(str(tmp_path / "one"), "1")
    assert started == [] and (tmp_path / "one").read_text() == "1"
