"""What an operator checks on a worker node in snapshotter mode (testinfra, through
Ansible): Docker 26 on the containerd image store with the cvmfs snapshotter, a pull of
an image whose layers are published that downloads none of them (the registry's access
log says so), containers that see the image as overlayfs shows it, a thin image, and a
snapshotter restart under a running container."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "common"))
from hardening import assert_hardened  # noqa: E402

EPHEMERAL = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "")
REGISTRY_DIR = os.path.join(EPHEMERAL, "registry")
LAZY_DIR = os.path.join(EPHEMERAL, "lazy")
UNITS = ("cvmfs-graphdriver-snapshotter.socket", "cvmfs-graphdriver-snapshotter.service",
         "containerd.service", "docker.service")


def run_ok(host, *argv: str) -> str:
    cmd = host.run(" ".join("'" + a.replace("'", "'\\''") + "'" for a in argv))
    assert cmd.rc == 0, f"{argv} exited {cmd.rc}\nstdout: {cmd.stdout}\nstderr: {cmd.stderr}"
    return cmd.stdout


@pytest.fixture(scope="module")
def sample() -> str:
    with open(os.path.join(REGISTRY_DIR, "address")) as f:
        return f"{f.read().strip()}/sample:1"


def registry_log_size() -> int:
    return os.path.getsize(os.path.join(REGISTRY_DIR, "registry.log"))


def registry_log_since(start: int) -> str:
    with open(os.path.join(REGISTRY_DIR, "registry.log"), errors="replace") as f:
        f.seek(start)
        return f.read()


def test_docker_runs_on_the_containerd_store_with_the_cvmfs_snapshotter(host):
    run_ok(host, "systemctl", "is-active", *UNITS)
    info = json.loads(run_ok(host, "docker", "info", "--format", "{{json .}}"))
    assert info["Driver"] == "cvmfs"
    assert ["driver-type", "io.containerd.snapshotter.v1"] in info["DriverStatus"]
    # containerd 1.7 shows a PLATFORMS column (linux/amd64), 1.6 a dash
    assert re.search(r"io\.containerd\.snapshotter\.v1\s+cvmfs\s+\S+\s+ok",
                     run_ok(host, "ctr", "plugins", "ls"))
    daemon_json = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon_json["features"] == {"containerd-snapshotter": True}
    assert "experimental" not in daemon_json
    toml = host.file("/etc/containerd/config.toml").content_string
    assert "[proxy_plugins.cvmfs]" in toml
    assert 'address = "/run/cvmfs-graphdriver/snapshotter.sock"' in toml
    # the site's own settings (prepare.yml) are kept, comments included
    assert "# the site's own containerd settings" in toml
    assert 'path = "/var/lib/containerd/opt"' in toml
    # the plugin face is not deployed, and Docker does not wait for it
    assert not host.file("/etc/systemd/system/cvmfs-graphdriver.socket").exists
    assert not host.file("/etc/systemd/system/docker.service.d/10-cvmfs-graphdriver.conf").exists
    assert host.file("/etc/systemd/system/containerd.service.d/10-cvmfs-snapshotter.conf").exists


def test_the_snapshotter_is_hardened_and_reachable_by_root_only(host):
    assert_hardened(host, ["cvmfs-graphdriver-snapshotter.service"],
                    ["/run/cvmfs-graphdriver/snapshotter.sock"])


def test_pulling_a_published_image_downloads_none_of_its_layers(host, sample):
    with open(os.path.join(LAZY_DIR, "layers.txt")) as f:
        layers = f.read().split()
    assert len(layers) == 2, layers
    start = registry_log_size()
    run_ok(host, "docker", "pull", sample)
    log = registry_log_since(start)
    assert "/manifests/" in log, log
    for digest in layers:
        assert not re.search(rf'"(?:GET|HEAD) [^"]*/blobs/{digest} ', log), \
            f"layer {digest} was downloaded:\n{log}"
    journal = run_ok(host, "journalctl", "-u", "cvmfs-graphdriver-snapshotter", "--no-pager")
    for digest in layers:
        assert f"layer {digest}: remote snapshot" in journal


def test_containers_see_the_image_as_overlayfs_shows_it(host, sample):
    out = run_ok(host, "docker", "run", "--rm", "--network", "none", sample, "sh", "-c",
                 "ls /etc/sample; echo --; ls /data/old; echo --; "
                 "find / -xdev -name '.wh.*' | wc -l")
    assert out.split() == ["base.txt", "top.txt", "--", "file2", "--", "0"]


def test_a_thin_image_runs(host):
    run_ok(host, "docker", "load", "-i", "/var/tmp/thin-image.tar")
    out = run_ok(host, "docker", "run", "--rm", "--network", "none",
                 "lazy.example.org/sample-thin:1")
    assert out == "from the base layer\nfrom the top layer\n"


def test_restarting_the_snapshotter_leaves_a_running_container_running(host, sample):
    cid = run_ok(host, "docker", "run", "-d", "--network", "none", sample,
                 "sleep", "300").strip()
    try:
        run_ok(host, "systemctl", "restart", "cvmfs-graphdriver-snapshotter.service")
        assert run_ok(host, "docker", "inspect", "-f", "{{.State.Running}}", cid).strip() == "true"
        assert run_ok(host, "docker", "exec", cid, "cat", "/etc/sample/top.txt") == \
            "from the top layer\n"
        # and new containers still start through the restarted snapshotter
        assert run_ok(host, "docker", "run", "--rm", "--network", "none", sample,
                      "echo", "new") == "new\n"
    finally:
        run_ok(host, "docker", "rm", "-f", cid)


CLI = "/opt/cvmfs-graphdriver/bin/cvmfs-graphdriver"


def test_check_passes_in_snapshotter_mode(host):
    """`cvmfs-graphdriver check` on the converged node: the configuration's [snapshotter]
    section makes it expect the snapshotter face, and everything passes."""
    doc = json.loads(run_ok(host, CLI, "check", "--json"))
    assert doc["ok"] is True and doc["failed"] == [] and doc["mode"] == "snapshotter", doc
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("config", "plugin socket", "snapshotter socket", "home", "overlay",
                 "free space", "layers", "engine", "engine config",
                 "repository lazy.example.org"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "VolumeDriver" in checks["plugin socket"]["detail"]
    assert "storage driver cvmfs (containerd snapshotter)" in checks["engine"]["detail"]
    assert "snapshotter mode: all checks passed" in run_ok(host, CLI, "check")


def test_status_counts_lazily_pulled_and_thin_layers(host, sample):
    """The tests above pulled the published image lazily and loaded a thin image."""
    doc = json.loads(run_ok(host, CLI, "status", "--json"))
    assert doc["mode"] == "snapshotter"
    assert doc["home"] == "/var/lib/cvmfs-graphdriver/snapshotter"
    assert doc["layers"]["lazy"] >= 2 and doc["layers"]["thin"] >= 1, doc
    assert doc["repositories"]["lazy.example.org"]["lazy"] >= 2, doc
    assert "lazy.example.org" in run_ok(host, CLI, "status")
