"""What an operator checks on a converged worker node (testinfra, through Ansible)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "common"))
from hardening import assert_hardened  # noqa: E402

BUSYBOX = "busybox:molecule"


def run_ok(host, *argv: str) -> str:
    """Run argv on the node, fail the test with its output unless it exits 0."""
    cmd = host.run(" ".join(_quote(a) for a in argv))
    assert cmd.rc == 0, f"{argv} exited {cmd.rc}\nstdout: {cmd.stdout}\nstderr: {cmd.stderr}"
    return cmd.stdout


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture(scope="module")
def busybox(host):
    """A regular image, imported into the node's dockerd (cvmfs storage driver)."""
    cmd = host.run(f"tar -C /var/tmp/busybox-image -c . | docker import -c 'CMD [\"sh\"]' - {BUSYBOX}")
    assert cmd.rc == 0, cmd.stderr
    return BUSYBOX


def test_overlay_available(host):
    assert "\toverlay\n" in host.file("/proc/filesystems").content_string


def test_cvmfs_client_configuration(host):
    local = host.file("/etc/cvmfs/default.local")
    assert local.exists and local.mode == 0o644
    text = local.content_string
    assert 'CVMFS_REPOSITORIES="thin.example.org"' in text
    assert 'CVMFS_HTTP_PROXY="DIRECT"' in text
    assert "CVMFS_QUOTA_LIMIT=10000" in text
    assert 'CVMFS_USE_GEOAPI="no"' in text
    domain = host.file("/etc/cvmfs/domain.d/example.org.local").content_string
    assert 'CVMFS_SERVER_URL="http://stratum1.example.org/cvmfs/@fqrn@"' in domain
    assert 'CVMFS_KEYS_DIR="/etc/cvmfs/keys/example.org"' in domain
    assert "MOLECULETESTKEY" in host.file("/etc/cvmfs/keys/example.org/thin.example.org.pub").content_string
    assert 'CVMFS_MAX_TTL="15"' in host.file("/etc/cvmfs/config.d/thin.example.org.local").content_string


def test_cvmfs_client_not_installed_in_this_scenario(host):
    # The scenario installs nothing (cvmfs_client_package_source: none); if this
    # fails, the scenario's README and prepare.yml need revisiting.
    assert not host.file("/usr/bin/cvmfs_config").exists
    assert host.file("/cvmfs/thin.example.org").is_directory


def test_daemon_json_merged(host):
    config = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert config == {
        # the site's own keys, written in prepare, kept
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "3"},
        # the role's keys
        "storage-driver": "cvmfs",
        "experimental": True,
        "bridge": "none",
        "iptables": False,
        "ip-masq": False,
        "log-level": "info",
    }


def test_driver_installed_from_the_wheel(host):
    assert host.file("/opt/cvmfs-graphdriver/bin/cvmfs-graphdriver").is_file
    out = run_ok(host, "/opt/cvmfs-graphdriver/bin/cvmfs-graphdriver", "show-config")
    assert "socket = /run/docker/plugins/cvmfs.sock" in out
    assert "log_level = debug" in out


def test_driver_units(host):
    socket = host.service("cvmfs-graphdriver.socket")
    assert socket.is_enabled and socket.is_running
    assert host.service("cvmfs-graphdriver.service").is_running
    assert host.socket("unix:///run/docker/plugins/cvmfs.sock").is_listening
    unit = host.file("/etc/systemd/system/cvmfs-graphdriver.service").content_string
    assert "Type=notify" in unit and "Restart=on-failure" in unit
    for forbidden in ("PrivateTmp", "ProtectSystem", "MountFlags", "PrivateMounts"):
        assert f"\n{forbidden}=" not in unit


def test_the_daemon_is_hardened_and_reachable_by_root_only(host):
    assert_hardened(host, ["cvmfs-graphdriver.service"], ["/run/docker/plugins/cvmfs.sock"])


def test_docker_uses_the_cvmfs_storage_driver(host):
    assert run_ok(host, "docker", "info", "--format", "{{.Driver}}").strip() == "cvmfs"
    assert host.service("docker.service").is_enabled


def test_regular_image_runs(host, busybox):
    out = run_ok(host, "docker", "run", "--rm", "--network", "none", busybox,
                 "sh", "-c", "echo hello > /greeting && cat /greeting && grep ' / ' /proc/mounts")
    lines = out.splitlines()
    assert lines[0] == "hello"
    assert lines[1].startswith("overlay / overlay"), out
    # the layers sit where the driver keeps them, laid out as overlay2's
    assert host.file("/var/lib/docker/cvmfs/l").is_directory


def test_driver_restart_keeps_running_containers(host, busybox):
    cid = run_ok(host, "docker", "run", "-d", "--network", "none", busybox, "sleep", "600").strip()
    try:
        before = json.loads(run_ok(host, "docker", "inspect", cid))[0]["State"]
        main_pid = run_ok(host, "systemctl", "show", "-p", "MainPID", "--value",
                          "cvmfs-graphdriver.service").strip()
        run_ok(host, "systemctl", "restart", "cvmfs-graphdriver.service")
        assert host.service("cvmfs-graphdriver.service").is_running
        new_pid = run_ok(host, "systemctl", "show", "-p", "MainPID", "--value",
                         "cvmfs-graphdriver.service").strip()
        assert new_pid != main_pid, "the driver was not restarted"
        time.sleep(1)
        after = json.loads(run_ok(host, "docker", "inspect", cid))[0]["State"]
        assert after["Running"] and after["Pid"] == before["Pid"]
        assert after["StartedAt"] == before["StartedAt"]
        # the container's root file system is still there and writable
        out = run_ok(host, "docker", "exec", cid, "sh", "-c", "echo alive > /alive && cat /alive")
        assert out.strip() == "alive"
    finally:
        # stop and remove need the driver (Put, Remove): they work after its restart
        run_ok(host, "docker", "rm", "-f", cid)


THIN = "thin.example.org/sample:1"


def test_thin_image_runs_from_the_repository_tree(host):
    """prepare.yml published a two-layer image with cvmfs-thin into the tree at
    /cvmfs/thin.example.org (what the CVMFS client would show) and copied the thin image
    here: the node stores only the descriptor, the container sees the source's files."""
    run_ok(host, "docker", "load", "-i", "/var/tmp/thin-image.tar")
    size = int(run_ok(host, "docker", "image", "inspect", "--format", "{{.Size}}", THIN))
    assert size < 64 * 1024, f"the thin image holds {size} bytes"
    out = run_ok(host, "docker", "run", "--rm", "--network", "none", THIN, "sh", "-c",
                 "cat /etc/sample/base.txt /etc/sample/top.txt; ls /etc/sample; "
                 "ls /data/old; find / -xdev -name '.wh.*' -o -xdev -name thin.json")
    assert out.splitlines() == [
        "from the base layer", "from the top layer",  # one file from each CVMFS layer
        "base.txt", "top.txt",  # gone.txt was deleted by the top layer
        "file2",  # /data/old was recreated: file1 of the base layer stays hidden
    ]  # and no .wh.* marker or thin.json shows
    info = run_ok(host, "docker", "info", "--format", "{{json .DriverStatus}}")
    rows = dict(json.loads(info))
    assert rows["CVMFS Repositories"] == "thin.example.org"
    assert rows["Repository thin.example.org"].startswith("1 thin layers")



def test_repository_as_a_volume(host, busybox):
    """graphdriver_volumes (default on): an allowed repository mounts into a container
    as a volume; anything else is refused, naming the allowed ones. (Read-only comes from
    the CVMFS client's mount, which this scenario's directory tree stands in for: the
    driver tests check it on a read-only mount.)"""
    out = run_ok(host, "docker", "run", "--rm", "--network", "none",
                 "--mount", "type=volume,volume-driver=cvmfs,src=thin.example.org,"
                 "dst=/cvmfs/thin.example.org", busybox, "sh", "-c",
                 "ls /cvmfs/thin.example.org/.layers | wc -l")
    assert int(out.strip()) >= 1, out
    cmd = host.run("docker run --rm --network none -v other.example.org:/x --volume-driver cvmfs "
                   f"{BUSYBOX} true")
    assert cmd.rc != 0 and "other.example.org" in cmd.stderr and "allowed" in cmd.stderr, \
        cmd.stderr
    run_ok(host, "docker", "volume", "rm", "thin.example.org")


# ----------------------------------------------- metrics (graphdriver_metrics_*)

TEXTFILE = "/var/lib/prometheus/node-exporter/cvmfs_graphdriver.prom"
METRICS_SOCKET = "/run/cvmfs-graphdriver/metrics.sock"
GET_METRICS = (
    "import socket; s = socket.socket(socket.AF_UNIX); s.connect('" + METRICS_SOCKET + "'); "
    "s.sendall(b'GET /metrics HTTP/1.0\\r\\n\\r\\n'); import sys; "
    "sys.stdout.write(b''.join(iter(lambda: s.recv(65536), b'')).decode())")


def _samples(text: str) -> dict:
    """{(name, frozenset(labels)): value}, as Prometheus' own parser reads the text."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sample(samples: dict, name: str, **labels: str) -> float:
    want = frozenset({"face": "graphdriver", **labels}.items())
    assert (name, want) in samples, (name, labels, sorted(samples))
    return samples[(name, want)]


def test_metrics_for_node_exporter_and_on_the_root_only_socket(host, busybox):
    """graphdriver_metrics_textfile_dir and _socket: the driver writes its metrics where
    node_exporter's textfile collector reads them, readable by node_exporter's user, and
    root gets the same over the socket; the counts follow what the node did."""
    f = host.file(TEXTFILE)
    assert f.is_file and f.user == "root" and f.mode == 0o644
    assert host.file(os.path.dirname(TEXTFILE)).mode == 0o755
    config = host.file("/etc/cvmfs-graphdriver/config.ini").content_string
    assert "metrics_textfile_dir = /var/lib/prometheus/node-exporter\n" in config
    # a layer pulled now shows in the next file (written every 2 s)
    before = _samples(f.content_string)
    run_ok(host, "sh", "-c", "echo metrics > /tmp/m.txt && tar -C /tmp -c m.txt | "
           "docker import - metrics:molecule")
    try:
        deadline = time.monotonic() + 20
        while True:
            now = _samples(host.file(TEXTFILE).content_string)
            grew = (_sample(now, "cvmfs_graphdriver_applydiff_total")
                    - _sample(before, "cvmfs_graphdriver_applydiff_total"))
            if grew >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert grew == 1, "the import's ApplyDiff is not counted"
        assert _sample(now, "cvmfs_graphdriver_applydiff_bytes_total") >= len("metrics\n")
        assert _sample(now, "cvmfs_graphdriver_layers", kind="regular") >= 2
        assert _sample(now, "cvmfs_graphdriver_repository_available",
                       repository="thin.example.org") == 1
    finally:
        run_ok(host, "docker", "rmi", "metrics:molecule")
    sock = host.file(METRICS_SOCKET)
    assert sock.is_socket and sock.user == "root" and sock.mode == 0o600
    reply = run_ok(host, "python3", "-c", GET_METRICS)
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200") and "text/plain; version=0.0.4" in head, head
    assert _sample(_samples(body), "cvmfs_graphdriver_applydiff_total") >= 1


# ----------------------------------------------- the operator's commands

CLI = "/opt/cvmfs-graphdriver/bin/cvmfs-graphdriver"


def test_check_passes_on_the_converged_node(host):
    """`cvmfs-graphdriver check`, as an operator runs it: every check passes (the
    repository's tree stands in for the client, the thin image's layers are read)."""
    doc = json.loads(run_ok(host, CLI, "check", "--json"))
    assert doc["ok"] is True and doc["failed"] == [] and doc["mode"] == "plugin", doc
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("config", "plugin socket", "home", "overlay", "free space", "layers",
                 "engine", "engine config", "repository thin.example.org"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["home"]["detail"].startswith("/var/lib/docker/cvmfs ")
    assert "storage driver cvmfs (graph-driver plugin)" in checks["engine"]["detail"]
    assert "plugin mode: all checks passed" in run_ok(host, CLI, "check")


def test_status_json_parses_and_counts_the_thin_image(host, busybox):
    doc = json.loads(run_ok(host, CLI, "status", "--json"))
    assert doc["mode"] == "plugin" and doc["home"] == "/var/lib/docker/cvmfs"
    assert doc["layers"]["regular"] >= 1 and doc["layers"]["thin"] >= 1, doc
    assert doc["repositories"]["thin.example.org"]["thin"] >= 1
    assert doc["disk"]["used_bytes"] > 0 and doc["disk"]["free_bytes"] > 0
    assert "thin.example.org" in run_ok(host, CLI, "status")


@pytest.fixture
def verify_play(pytestconfig):
    """playbooks/verify.yml against the node, as the README runs it."""
    project = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
    inventory = pytestconfig.getoption("ansible_inventory")
    env = dict(os.environ, ANSIBLE_ROLES_PATH=os.path.join(project, "roles"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(project, "collections"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    ansible_playbook = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")

    def play(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([ansible_playbook, "-i", inventory,
                               os.path.join(project, "playbooks", "verify.yml"),
                               "-e", "verify_pull=false", "-e", f"verify_image={BUSYBOX}",
                               *args], env=env, capture_output=True, text=True, timeout=600)
    return play


def test_verify_playbook_runs_the_preflight(verify_play, busybox):
    result = verify_play()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "cvmfs-graphdriver check: " in out and " failed=0 " in out, out


def test_verify_playbook_fails_with_the_failing_checks_and_their_fixes(verify_play, busybox):
    result = verify_play("-e", "verify_storage_driver=overlay2")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Fail with the failing checks and their fixes" in out, out
    assert "engine; Docker " in out and "not 'overlay2' as a graph-driver plugin" in out, out
    assert "fix: run site.yml" in out, out

# ----------------------------------------------- docker_engine: version handling

ROLE_PLAY = """\
- name: Docker engine role only
  hosts: workers
  become: true
  roles:
    - cvmfs_graphdriver.provisioning.docker_engine
"""


@pytest.fixture
def docker_engine_play(tmp_path, pytestconfig):
    """Run only the docker_engine role on the node, as `ansible-playbook` would."""
    project = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
    playbook = tmp_path / "docker_engine.yml"
    playbook.write_text(ROLE_PLAY)
    inventory = pytestconfig.getoption("ansible_inventory")
    env = dict(os.environ, ANSIBLE_ROLES_PATH=os.path.join(project, "roles"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(project, "collections"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    ansible_playbook = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")

    def play(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([ansible_playbook, "-i", inventory, str(playbook), *args],
                              env=env, capture_output=True, text=True, timeout=600)
    return play


@pytest.fixture
def fake_dockerd_version(host):
    """Make `dockerd --version` (as the role runs it, through PATH) report another version;
    docker.service keeps running the real /usr/sbin/dockerd."""
    fake = "/usr/local/sbin/dockerd"

    def install(version: str) -> None:
        script = f'#!/bin/sh\\necho "Docker version {version}, build 0000000"\\n'
        run_ok(host, "sh", "-c", f"printf '{script}' > {fake} && chmod 0755 {fake}")
    yield install
    run_ok(host, "rm", "-f", fake)


def _unchanged(host, out: str, before: str) -> None:
    assert "Nothing was changed" in out and " changed=0 " in out, out
    assert host.file("/etc/docker/daemon.json").content_string == before
    assert not host.file("/etc/systemd/system/docker.service.d/20-graphdriver-plugins.conf").exists
    assert not host.file("/etc/systemd/system/containerd.service.d/10-cvmfs-snapshotter.conf").exists
    assert run_ok(host, "docker", "info", "--format", "{{.Driver}}").strip() == "cvmfs"


def test_docker_28_in_plugin_mode_is_refused_and_nothing_changes(host, docker_engine_play,
                                                                 fake_dockerd_version):
    before = host.file("/etc/docker/daemon.json").content_string
    fake_dockerd_version("28.1.1")
    result = docker_engine_play("-e", "docker_engine_mode=plugin")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Docker 28.1.1 is installed on this node" in out
    assert "Docker 28 removed graph-driver plugins" in out and "snapshotter" in out
    _unchanged(host, out, before)


def test_docker_28_would_switch_to_the_snapshotter_a_node_with_images_refused(
        host, docker_engine_play, fake_dockerd_version):
    # auto picks the snapshotter for Docker 28; this node holds images under the plugin
    # (prepare and the tests above pulled some), which Docker would no longer see.
    before = host.file("/etc/docker/daemon.json").content_string
    fake_dockerd_version("28.1.1")
    result = docker_engine_play()
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "under cvmfs (graph driver); it is to use cvmfs (containerd snapshotter)" in out
    assert "docker_engine_allow_storage_switch: true" in out
    _unchanged(host, out, before)


def test_docker_27_gets_the_plugin_switch_check_mode_shows_it(host, docker_engine_play,
                                                              fake_dockerd_version):
    fake_dockerd_version("27.5.1")
    result = docker_engine_play("--check", "--diff")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "+Environment=DOCKERD_DEPRECATED_GRAPHDRIVER_PLUGINS=1" in out
    assert " failed=0 " in out, out
    # check mode: the node is left as it was
    assert not host.file("/etc/systemd/system/docker.service.d/20-graphdriver-plugins.conf").exists
