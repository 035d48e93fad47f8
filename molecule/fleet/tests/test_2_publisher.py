"""The publisher node: the stratum 0 that cvmfs-thin published into, and the site squid
the workers' clients went through (these tests run after the workers')."""

from __future__ import annotations

from conftest import REPO, images, run_ok

testinfra_hosts = ["ansible://publishers"]


def test_stratum0_serves_the_repository(host):
    port = host.ansible.get_variables()["fleet_stratum0_port"]
    assert REPO in run_ok(host, "cvmfs_server", "list")
    run_ok(host, "curl", "-fsS", "-o", "/dev/null", f"http://127.0.0.1:{port}/cvmfs/{REPO}/.cvmfspublished")
    # no transaction left open by cvmfs-thin
    assert not host.file(f"/var/spool/cvmfs/{REPO}/in_transaction.lock").exists


def test_published_layers_keep_the_images_owners(host):
    out = run_ok(host, "sh", "-c", f"stat -c '%u:%g' /cvmfs/{REPO}/.layers/*/*/layerfs/srv/owned/file")
    assert out.split() == ["1234:2345"], out


def test_thin_image_layers_are_all_in_the_repository(host):
    out = run_ok(host, "/opt/cvmfs-thin/bin/cvmfs-thin", "inspect", images()["thin"])
    print(out)


def test_workers_fetched_through_the_site_squid(host):
    log = run_ok(host, "cat", "/var/log/squid/access.log")
    data = [line for line in log.splitlines() if f"/cvmfs/{REPO}/data/" in line]
    assert data, f"no object of {REPO} went through the squid:\n{log}"
    print(f"{len(data)} object requests through the squid, e.g. {data[0]}")
