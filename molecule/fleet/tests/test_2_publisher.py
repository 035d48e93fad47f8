"""The publisher node: the stratum 0 that cvmfs-thin published into, and the site squid
the workers' clients went through (these tests run after the workers')."""

from __future__ import annotations

import json

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


THIN = "/opt/cvmfs-thin/bin/cvmfs-thin"


def test_the_publisher_role_published_from_a_wish_list(host):
    """playbooks/publish.yml (converge.yml): the role wrote the wish list with the tag glob,
    cvmfs-thin recorded the thin image in the repository, with layers that are there."""
    imgs = images()
    wishlist = host.file("/etc/cvmfs-thin/wishlist.yml")
    assert wishlist.exists and f"{imgs['source'].rsplit(':', 1)[0]}:*" in wishlist.content_string
    recorded = json.loads(run_ok(host, THIN, "images", f"cvmfs:{REPO}", "--json"))
    (record,) = [r for r in recorded if r["image"] == imgs["thin"]]
    assert record["kind"] == "thin" and record["source"] == imgs["source"]
    assert not record["forgotten"] and len(record["paths"]) == 2
    for path in record["paths"]:
        assert host.file(f"/cvmfs/{REPO}/{path}").is_directory, path


def test_publishing_again_publishes_nothing(host):
    """The wish list's rerun (what the idempotence step did) skips the published image, and
    its --json report says nothing changed; gc finds nothing to delete."""
    imgs = images()
    doc = json.loads(run_ok(host, THIN, "publish", "/etc/cvmfs-thin/wishlist.yml", "--json",
                            "--wait", "120"))
    assert doc["changed"] is False and doc["failed"] == 0, doc
    assert [(i["image"], i["status"]) for i in doc["images"]] == [(imgs["thin"], "skipped")]
    gc = json.loads(run_ok(host, THIN, "gc", f"cvmfs:{REPO}", "--json", "--wait", "120"))
    assert gc["dry_run"] is True and gc["delete"] == [] and gc["records"] == 1, gc
    assert not host.file(f"/var/spool/cvmfs/{REPO}/in_transaction.lock").exists
