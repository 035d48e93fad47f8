"""After the upgrade from the previous release (prepare.yml) to this checkout (converge):
what it changed on the node, and what it kept (testinfra, through Ansible)."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET

import pytest

NODE = "cvmfs-graphdriver-upgrade-node1"

# What converging this checkout changes on a node the previous release (v0.1.0)
# provisioned: (role, task or handler) as the run names them. Nothing else may change -
# above all not Docker (a restart would stop the node's containers). When a release
# changes what the roles write on a node, the new entries go here: this list is what an
# operator's upgrade does.
WHEEL_CHANGES = {
    # Only when the new wheel's bytes differ from the installed one: the driver's sources
    # changed since the tag, or the build did (v0.1.0's role built with the controller's
    # umask, scripts/build-wheel.sh with 022, so from v0.1.0 it is always so). The wheel
    # is replaced, installed, and the driver restarted (its mounts and the containers stay).
    ("graphdriver", "Ensure the driver's wheel is on the node (from the controller)"),
    ("graphdriver", "Ensure the driver is installed in its virtualenv (no package index)"),
    ("graphdriver", "Record which package the virtualenv holds"),
    ("graphdriver", "Restart graphdriver services"),
}
ALWAYS_CHANGES: set[tuple[str, str]] = set()


def run_ok(host, *argv: str) -> str:
    """Run argv on the node, fail the test with its output unless it exits 0."""
    cmd = host.run(" ".join("'" + a.replace("'", "'\\''") + "'" for a in argv))
    assert cmd.rc == 0, f"{argv} exited {cmd.rc}\nstdout: {cmd.stdout}\nstderr: {cmd.stderr}"
    return cmd.stdout


@pytest.fixture(scope="module")
def before(host):
    """The containers, their images and the installed wheel, recorded by prepare.yml."""
    return json.loads(host.file("/var/tmp/upgrade-before.json").content_string)


def changed_tasks(report: str, node: str) -> list[tuple[str, str]]:
    """(role, task) of every task the run reported changed on node, from its JUnit report
    (JUNIT_FAIL_ON_CHANGE: a changed task is a failure named "[host] play: role : task")."""
    changed = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        if not name.startswith(f"[{node}] ") or case.find("failure") is None:
            continue
        task = name.split(": ", 1)[1]
        role, _, task_name = task.rpartition(" : ")
        changed.append((role.rsplit(".", 1)[-1], task_name))
    return changed


@pytest.fixture(scope="module")
def converge_reports():
    """The JUnit reports of the converge and the idempotence run, oldest first."""
    ephemeral = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    assert ephemeral, "run through molecule (MOLECULE_EPHEMERAL_DIRECTORY is not set)"
    reports = sorted(glob.glob(os.path.join(ephemeral, "junit", "converge-*.xml")),
                     key=lambda p: float(os.path.basename(p)[len("converge-"):-len(".xml")]))
    assert len(reports) >= 2, f"expected the converge's and the idempotence run's reports, found {reports}"
    return reports


def test_the_upgrade_changed_what_it_should(host, before, converge_reports):
    installed = host.file("/opt/cvmfs-graphdriver/dist/installed.sha1").content_string.strip()
    wheel_changed = installed != before["installed_sha1"]
    expected = ALWAYS_CHANGES | (WHEEL_CHANGES if wheel_changed else set())
    changed = changed_tasks(converge_reports[0], NODE)
    print(f"the upgrade changed {len(changed)} task(s) on {NODE} (new wheel: {wheel_changed}): {changed}")
    assert len(changed) == len(set(changed)), f"a task changed twice: {changed}"
    assert set(changed) == expected, (
        f"unexpected: {sorted(set(changed) - expected)}; missing: {sorted(expected - set(changed))}")


def test_the_second_converge_changed_nothing(converge_reports):
    assert changed_tasks(converge_reports[1], NODE) == []


def test_containers_survived(host, before):
    for old in before["containers"]:
        now = json.loads(run_ok(host, "docker", "inspect", old["Id"]))[0]
        assert now["State"]["Running"], f"{old['Name']} is not running: {now['State']}"
        # The same container, never restarted (Docker was not restarted under it).
        assert now["State"]["StartedAt"] == old["State"]["StartedAt"], old["Name"]
        assert now["State"]["Pid"] == old["State"]["Pid"], old["Name"]
        assert now["Image"] == old["Image"]
    out = run_ok(host, "docker", "exec", "upgrade-thin", "cat", "/etc/sample/top.txt")
    assert out.strip(), "the thin container cannot read its files any more"


def test_images_remain_and_run(host, before):
    for old in before["containers"]:
        run_ok(host, "docker", "image", "inspect", old["Image"])
    out = run_ok(host, "docker", "run", "--rm", "--network", "none", "busybox:upgrade", "echo", "regular ok")
    assert out.strip() == "regular ok"
    out = run_ok(host, "docker", "run", "--rm", "--network", "none", "thin.example.org/sample:1",
                 "cat", "/etc/sample/base.txt")
    assert out.strip()


def test_docker_runs_the_cvmfs_driver_from_the_new_wheel(host):
    assert run_ok(host, "docker", "info", "--format", "{{.Driver}}").strip() == "cvmfs"
    assert host.service("cvmfs-graphdriver.socket").is_running


# ------------------------------------- graphdriver: the wheel from a URL, old variables

ROLE_PLAY = """\
- name: The graphdriver role only
  hosts: workers
  become: true
  roles:
    - cvmfs_graphdriver.provisioning.graphdriver
"""


@pytest.fixture
def graphdriver_play(pytestconfig):
    """Run only the graphdriver role on the node, as `ansible-playbook` would."""
    project = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
    # A directory of its own (not pytest's tmp_path, whose clean-up walks other runs' dirs).
    with tempfile.TemporaryDirectory(prefix="upgrade-role-play-") as tmp:
        playbook = os.path.join(tmp, "graphdriver.yml")
        with open(playbook, "w") as f:
            f.write(ROLE_PLAY)
        env = dict(os.environ, ANSIBLE_ROLES_PATH=os.path.join(project, "roles"),
                   ANSIBLE_COLLECTIONS_PATH=os.path.join(project, "collections"),
                   ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", JUNIT_OUTPUT_DIR=tmp)
        ansible_playbook = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")

        def play(*extra_vars: str) -> tuple[int, str]:
            argv = [ansible_playbook, "-i", pytestconfig.getoption("ansible_inventory"), playbook]
            for var in extra_vars:
                argv += ["-e", var]
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
            return result.returncode, result.stdout + result.stderr
        yield play


@contextlib.contextmanager
def served(directory: str):
    """An HTTP server on 127.0.0.1 (the node shares this machine's network) serving directory."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_wheel_from_a_url_with_its_checksum(host, graphdriver_play):
    project = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
    wheels = glob.glob(os.path.join(project, "dist", "cvmfs_graphdriver-*.whl"))
    assert len(wheels) == 1, f"the converge left one wheel in dist/, found {wheels}"
    name = os.path.basename(wheels[0])
    with open(wheels[0], "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    installed = host.file("/opt/cvmfs-graphdriver/dist/installed.sha1").content_string
    with served(os.path.dirname(wheels[0])) as url:
        # The wheel the node runs, fetched by the node: nothing to change.
        rc, out = graphdriver_play(f"graphdriver_package_file={url}/{name}",
                                   f"graphdriver_package_checksum=sha256:{sha256}")
        assert rc == 0 and " changed=0 " in out, out
        # A checksum that does not match: the role fails, the installed driver stays.
        rc, out = graphdriver_play(f"graphdriver_package_file={url}/{name}",
                                   "graphdriver_package_checksum=sha256:" + "0" * 64)
        assert rc != 0 and "did not match " + "0" * 64 in out, out
    assert host.file("/opt/cvmfs-graphdriver/dist/installed.sha1").content_string == installed
    assert host.service("cvmfs-graphdriver.socket").is_running


def test_the_variables_0_2_0_removed_are_refused_with_what_to_do(graphdriver_play):
    rc, out = graphdriver_play("graphdriver_source_dir=/srv/driver")
    assert rc != 0, out
    assert "no longer builds the driver" in out and "scripts/build-wheel.sh" in out, out
    assert " changed=0 " in out, out
