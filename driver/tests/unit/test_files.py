"""The durable-write helpers (files.py)."""

from __future__ import annotations

import os
import threading

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
