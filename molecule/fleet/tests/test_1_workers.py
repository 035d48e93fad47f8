"""The two workers, as an operator checks them after site.yml: the real CVMFS client
(installed from the scenario's source) mounts the stratum 0 through the site's squid,
and the thin image the publisher pushed runs, with nothing of the source image
downloaded and its files fetched by the CVMFS client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

from conftest import EPHEMERAL, REPO, images, run_ok

testinfra_hosts = ["ansible://workers"]

MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])


def fleet_vars(host) -> dict:
    return host.ansible.get_variables()


def xattr(host, name: str) -> str:
    return run_ok(host, "getfattr", "--only-values", "-n", f"user.{name}", f"/cvmfs/{REPO}").strip()


def manifest(registry: str, reference: str) -> dict:
    name, tag = reference[len(registry) + 1:].rsplit(":", 1)
    req = urllib.request.Request(f"http://{registry}/v2/{name}/manifests/{tag}",
                                 headers={"Accept": MANIFEST_TYPES})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def registry_log() -> str:
    with open(os.path.join(EPHEMERAL, "registry", "registry.log"), errors="replace") as f:
        return f.read()


def test_client_installed_from_the_scenarios_source(host):
    assert host.package("cvmfs").is_installed
    assert host.package("cvmfs-fuse3").is_installed
    if fleet_vars(host)["fleet_cvmfs_source"] == "files":
        # the package files the role copied from the controller
        listing = run_ok(host, "ls", "/var/cache/cvmfs-client-packages")
        for name in ("cvmfs-config-none_", "cvmfs-libs_", "cvmfs_", "cvmfs-fuse3_"):
            assert name in listing, listing


def test_repository_mounted_through_fstab_and_probed(host):
    fstab = host.file("/etc/fstab").content_string
    assert f"{REPO} /cvmfs/{REPO} cvmfs defaults,_netdev,nodev 0 0" in fstab
    mount = run_ok(host, "findmnt", "-n", "-o", "SOURCE,FSTYPE", f"/cvmfs/{REPO}").split()
    assert mount == ["cvmfs2", "fuse"], mount
    out = run_ok(host, "cvmfs_config", "probe", REPO)
    assert out.strip() == f"Probing /cvmfs/{REPO}... OK", out


def test_client_configuration_for_a_layer_repository(host):
    config = run_ok(host, "cvmfs_config", "showconfig", REPO)
    v = fleet_vars(host)
    assert f"CVMFS_HTTP_PROXY='http://127.0.0.1:{v['fleet_squid_port']}'" in config \
        or f"CVMFS_HTTP_PROXY=http://127.0.0.1:{v['fleet_squid_port']}" in config, config
    assert re.search(r"^CVMFS_CLAIM_OWNERSHIP=.?no", config, re.M), config
    assert re.search(r"^CVMFS_KEYS_DIR=.?/etc/cvmfs/keys/fleet.example.org", config, re.M), config


def test_client_goes_through_the_site_squid(host):
    v = fleet_vars(host)
    assert xattr(host, "proxy") == f"http://127.0.0.1:{v['fleet_squid_port']}"
    assert xattr(host, "host") == f"http://127.0.0.1:{v['fleet_stratum0_port']}/cvmfs/{REPO}"


def test_layers_keep_their_owners_on_the_client(host):
    # published with --keep-ownership, mounted with CVMFS_CLAIM_OWNERSHIP=no
    found = run_ok(host, "sh", "-c", f"stat -c '%u:%g %a' /cvmfs/{REPO}/.layers/*/*/layerfs/srv/owned/file")
    assert found.split() == ["1234:2345", "640"], found


def test_thin_image_runs_and_downloads_nothing_of_the_source(host):
    imgs = images()
    registry = imgs["registry"]
    source_layers = {layer["digest"] for layer in manifest(registry, imgs["source"])["layers"]}
    thin = manifest(registry, imgs["thin"])
    thin_blobs = {thin["config"]["digest"]} | {layer["digest"] for layer in thin["layers"]}
    assert len(thin["layers"]) == 1, thin
    assert not source_layers & thin_blobs

    run_ok(host, "docker", "rmi", "-f", imgs["thin"])  # the second run of a test session
    start = len(registry_log())
    run_ok(host, "docker", "pull", "-q", imgs["thin"])
    fetched = set(re.findall(r'"GET [^"]*/blobs/(sha256:[0-9a-f]{64}) ', registry_log()[start:]))
    assert fetched, "the pull fetched no blob from the registry"
    assert fetched <= thin_blobs, f"fetched beyond the thin image: {fetched - thin_blobs}"
    assert not fetched & source_layers

    size = int(run_ok(host, "docker", "image", "inspect", "--format", "{{.Size}}", imgs["thin"]))
    assert size < 64 * 1024, f"the thin image holds {size} bytes"

    before = int(xattr(host, "ndownload"))
    out = run_ok(host, "docker", "run", "--rm", "--network", "none", imgs["thin"], "sh", "-c",
                 "cat /etc/sample/base.txt /etc/sample/top.txt; ls /etc/sample; ls /data/old; "
                 "stat -c '%u:%g %a %n' /srv/owned /srv/owned/file /etc/sample/top.txt; "
                 "find / -xdev -name '.wh.*' -o -name .cvmfscatalog -o -name thin.json")
    assert out.splitlines() == [
        "from the base layer", "from the top layer",  # one file from each CVMFS layer
        "base.txt", "top.txt",  # gone.txt was deleted by the top layer
        "file2",  # /data/old was recreated: file1 of the base layer stays hidden
        "1234:2345 750 /srv/owned",  # owners and modes as the image has them
        "1234:2345 640 /srv/owned/file",
        "4321:5432 644 /etc/sample/top.txt",
    ], out  # and no .wh.* marker, .cvmfscatalog or thin.json shows
    after = int(xattr(host, "ndownload"))
    assert after > before, f"the CVMFS client fetched nothing ({before} -> {after} downloads)"
    stat = run_ok(host, "cvmfs_config", "stat", "-v", REPO)
    print(stat)
    squid = fleet_vars(host)["fleet_squid_port"]
    assert f"through proxy http://127.0.0.1:{squid} (online)" in stat, stat

    rows = dict(json.loads(run_ok(host, "docker", "info", "--format", "{{json .DriverStatus}}")))
    assert rows["Repository " + REPO].startswith("1 thin layers"), rows


ROLE_PLAY = """\
- name: CVMFS client role only
  hosts: {host}
  become: true
  roles:
    - cvmfs_graphdriver.provisioning.cvmfs_client
"""


def test_a_repository_that_cannot_be_mounted_fails_the_play_by_name(host, tmp_path, pytestconfig):
    """The role on the first worker with one more repository, which the stratum 0 does
    not have: the play fails, naming it and what to check; then the node is put back."""
    v = fleet_vars(host)
    name = v["inventory_hostname"]
    if name != sorted(v["groups"]["workers"])[0]:
        return  # once is enough
    project = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
    playbook = tmp_path / "cvmfs_client.yml"
    playbook.write_text(ROLE_PLAY.format(host=name))
    env = dict(os.environ, ANSIBLE_ROLES_PATH=os.path.join(project, "roles"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(project, "collections"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
            "-i", pytestconfig.getoption("ansible_inventory"), str(playbook)]
    missing = "missing.fleet.example.org"
    try:
        result = subprocess.run(
            [*argv, "-e", json.dumps({"cvmfs_client_repositories": [REPO, missing]})],
            env=env, capture_output=True, text=True, timeout=600)
        out = result.stdout + result.stderr
        assert result.returncode != 0, out
        assert f"CernVM-FS cannot mount {missing} at /cvmfs/{missing} on {name}" in out, out
        assert "cvmfs_config showconfig " + missing in out, out
        # the repository that works stays mounted
        assert run_ok(host, "findmnt", "-n", "-o", "FSTYPE", f"/cvmfs/{REPO}").strip() == "fuse"
    finally:
        run_ok(host, "sed", "-i", f"/^{missing} /d", "/etc/fstab")
        run_ok(host, "rm", "-rf", f"/cvmfs/{missing}")
        restore = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert restore.returncode == 0, restore.stdout + restore.stderr
    assert f"{missing}" not in host.file("/etc/cvmfs/default.local").content_string
