"""The `snapshotter` command line: the graph-driver face stays standard-library only, a
missing grpc is named, configuration keys."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cvmfs_graphdriver.config import ConfigError, parse


def _run(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.fixture
def no_grpc(tmp_path) -> str:
    """A PYTHONPATH entry under which `import grpc` fails, as on a node without it."""
    for mod in ("grpc", "google/protobuf"):
        d = tmp_path / "blocked" / mod
        d.mkdir(parents=True)
        (d / "__init__.py").write_text(f'raise ImportError("No module named {mod}")\n')
    (tmp_path / "blocked" / "google" / "__init__.py").write_text("")
    return str(tmp_path / "blocked")


def test_graph_driver_face_never_imports_grpc(no_grpc):
    code = ("import sys, cvmfs_graphdriver.cli, cvmfs_graphdriver.driver, "
            "cvmfs_graphdriver.server; "
            "cvmfs_graphdriver.cli.main(['show-config', '--config', '/dev/null']); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'grpc' "
            "or m.startswith('google.protobuf')], sorted(sys.modules)")
    r = _run("-c", code, pythonpath=no_grpc)
    assert r.returncode == 0, r.stderr
    r = _run("-m", "cvmfs_graphdriver", "serve", "--help", pythonpath=no_grpc)
    assert r.returncode == 0, r.stderr


def test_snapshotter_without_grpc_says_what_to_install(no_grpc, tmp_path):
    r = _run("-m", "cvmfs_graphdriver", "snapshotter", "--config", "/dev/null",
             "--home", str(tmp_path / "h"), "--socket", str(tmp_path / "s.sock"),
             pythonpath=no_grpc)
    assert r.returncode == 2
    assert "grpcio" in r.stderr and "protobuf" in r.stderr
    assert "cvmfs-graphdriver[snapshotter]" in r.stderr
    assert "Traceback" not in r.stderr


def test_snapshotter_section_keys():
    cfg = parse("[snapshotter]\nsocket = /run/x/s.sock\nhome = /srv/snap\n"
                "[driver]\nlog_level = debug\n")
    assert (cfg.snapshotter_socket, cfg.snapshotter_home, cfg.log_level) == (
        "/run/x/s.sock", "/srv/snap", "debug")
    defaults = parse("")
    assert defaults.snapshotter_socket == "/run/cvmfs-graphdriver/snapshotter.sock"
    assert defaults.snapshotter_home == "/var/lib/cvmfs-graphdriver/snapshotter"


@pytest.mark.parametrize("text, words", [
    ("[snapshotter]\nsokcet = /x\n", ["'sokcet'", "[snapshotter]", "home", "socket"]),
    ("[snapshotter]\nhome = relative/dir\n", ["home", "relative/dir", "absolute"]),
    ("[driver]\nsnapshotter_home = /x\n", ["'snapshotter_home'", "[driver]"]),
    ("[snapshoter]\nhome = /x\n", ["[snapshoter]", "[snapshotter]"]),
])
def test_snapshotter_config_errors(text, words):
    with pytest.raises(ConfigError) as e:
        parse(text, "c.ini")
    for w in words:
        assert w in str(e.value)


def test_show_config_prints_the_snapshotter_keys(tmp_path):
    p = tmp_path / "c.ini"
    p.write_text("[snapshotter]\nhome = /srv/snap\n")
    r = _run("-m", "cvmfs_graphdriver", "show-config", "--config", str(p))
    assert r.returncode == 0, r.stderr
    assert "snapshotter_home = /srv/snap" in r.stdout.splitlines()
    assert "socket = /run/docker/plugins/cvmfs.sock" in r.stdout.splitlines()


def test_flags_override_the_file(tmp_path):
    p = tmp_path / "c.ini"
    p.write_text("[snapshotter]\nhome = relative\n")
    r = _run("-m", "cvmfs_graphdriver", "snapshotter", "--config", str(p))
    assert r.returncode == 2 and "absolute" in r.stderr  # the file's value is checked
