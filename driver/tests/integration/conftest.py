"""Fixtures shared by the integration tests (the real components come from ../conftest.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dockerutil import container_ids, image_ids, image_tags, remove_new  # noqa: E402


@pytest.fixture
def docker_clean(dockerd, busybox):
    """The dockerd using our driver, with busybox imported; whatever a test leaves behind
    (containers, tags, images) is removed afterwards so tests stay independent."""
    before = (container_ids(dockerd), image_tags(dockerd), image_ids(dockerd))
    yield dockerd
    if dockerd.proc is not None and dockerd.proc.poll() is None:
        remove_new(dockerd, *before)


@pytest.fixture
def scratch(tmp_path) -> str:
    """A per-test directory for build contexts, saved images and exports."""
    return str(tmp_path)
