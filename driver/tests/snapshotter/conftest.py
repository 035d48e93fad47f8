"""Fixtures of the snapshotter tests."""

from __future__ import annotations

from typing import Callable, Iterator, List

import pytest
from sntools import Daemon


@pytest.fixture
def new_daemon(tmp_path) -> Iterator[Callable[..., Daemon]]:
    """Factory of snapshotter daemons (not started); every one is stopped afterwards,
    whatever the test did (a failed assertion must not leave a daemon running)."""
    made: List[Daemon] = []

    def make(name: str = "d", **kw) -> Daemon:
        d = Daemon(str(tmp_path / name), **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
