"""The fuzzers (issue 11): hypothesis profiles, the corpus, and what every fuzzer checks.

Profiles, chosen by HYPOTHESIS_PROFILE:

- "ci" (the default): bounded - each fuzzer runs its CI share of examples (fuzzkit.examples)
  with a deadline per example, all of them together in about two minutes; the corpus is
  replayed read-only (CI never writes into the checkout).
- "dev": as "ci", but a failure found is saved into the corpus (commit it).
- "deep": long local runs, 50 times the examples, no deadline, failures saved into the
  corpus.

The corpus is hypothesis' example database kept in the repository (corpus/): every
failing example a "dev" or "deep" run found, replayed first by every later run. Each bug
found also has an explicit @example next to its fuzzer.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

HERE = os.path.dirname(os.path.abspath(__file__))
for helpers in ("driver", "snapshotter"):  # layer_tools, sntools: imported by plain name
    path = os.path.join(HERE, os.pardir, helpers)
    if path not in sys.path:
        sys.path.insert(0, path)

CORPUS = os.path.join(HERE, "corpus")
_corpus = DirectoryBasedExampleDatabase(CORPUS)
_common = dict(
    # Examples make their own temporary directories; the fixtures a fuzzer takes (a
    # server, a sentinel base directory) are meant to be shared by its examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("ci", deadline=2000, database=ReadOnlyDatabase(_corpus), **_common)
settings.register_profile("dev", deadline=2000, database=_corpus, **_common)
settings.register_profile("deep", deadline=None, database=_corpus, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def plugin_socket(tmp_path_factory) -> Iterator[str]:
    """A PluginServer for an initialised Driver on a unix socket (its path), shared by
    the examples of a module."""
    from harness import need

    from cvmfs_graphdriver.config import Config
    from cvmfs_graphdriver.driver import Driver
    from cvmfs_graphdriver.server import PluginServer
    from cvmfs_graphdriver.sockets import bind_socket

    need(os.geteuid() == 0, "needs root (the driver chowns and mounts)")
    home = str(tmp_path_factory.mktemp("fuzz-home"))
    d = Driver(Config())
    d.init(home, None, None, None)
    sockdir = tempfile.mkdtemp(prefix="cgd-fz-", dir="/tmp")
    path = os.path.join(sockdir, "p.sock")
    srv = PluginServer(bind_socket(path), d)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    yield path
    srv.shutdown()
    srv.server_close()
    t.join(10)
    d.cleanup()
    shutil.rmtree(sockdir, ignore_errors=True)
