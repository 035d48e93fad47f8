"""Lazy pulls end to end (issue 8): an image pushed to a registry, its layers published
with `cvmfs-thin convert --digests registry` into a repository (the session's `cvmfs`
fixture: a real CernVM-FS stratum 0 and client mount where scripts/cvmfs.sh installed it),
then pulled into a private containerd through the snapshotter by a client that adds the
remote-snapshotter annotations as Docker >= 24, nerdctl and the CRI do (lazypull). The
registry's access log must show no request for a published layer's blob, and containers
must see the image as overlayfs would, deletions included."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from containerd_harness import Containerd
from harness import busybox_rootfs, tar_of
from sntools import Daemon, need, need_grpc

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
REPO = "test.repo"


def build_go_tool(name: str) -> str:
    r = subprocess.run(["bash", os.path.join(TOP, "scripts", "build-go-tool.sh"), name],
                       capture_output=True, text=True, timeout=1800)
    need(r.returncode == 0, f"cannot build {name}:\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


class Log:
    """The registry's access log from a point on."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = os.path.getsize(path)

    def since(self) -> str:
        with open(self.path, errors="replace") as f:
            f.seek(self.start)
            return f.read()

    def blob_requests(self, digest: str) -> list:
        return re.findall(rf'"(?:GET|HEAD) [^"]*/blobs/{re.escape(digest)} ', self.since())


def registry_layers(ref_dockerd, ref: str) -> list:
    """The layer digests of `ref`'s manifest, as pushed (docker's own view)."""
    out = ref_dockerd.out("manifest", "inspect", "--insecure", ref)
    return re.findall(r'"digest": "(sha256:[0-9a-f]{64})"', out)[1:]  # [0] is the config


@pytest.fixture(scope="module")
def published(ref_dockerd, registry, cvmfs, tmp_path_factory):
    """Two images in the registry: cgd/lazy:1 (busybox + a layer that deletes and makes
    a directory opaque), published into the repository tree; cgd/lazy:2 = lazy:1 plus a
    layer that is not published."""
    need(os.geteuid() == 0, "needs root")
    need(shutil.which("cvmfs-thin") or os.path.exists(os.path.join(TOP, ".venv/bin/cvmfs-thin")),
         "cvmfs-thin is not installed (scripts/setup.sh)")
    work = str(tmp_path_factory.mktemp("lazy"))
    d = ref_dockerd
    base = tar_of(busybox_rootfs(os.path.join(work, "rootfs")))
    d.docker("import", "-c", 'CMD ["/bin/sh"]', "-", "cgd-lazy-base:1", input=base)
    d.docker("run", "--name", "cgd-lazy-1", "--network", "none", "cgd-lazy-base:1", "sh", "-c",
             "rm /etc/group && mkdir -p /data/opq && echo old > /data/opq/old && "
             "echo kept > /data/kept")
    d.docker("commit", "cgd-lazy-1", "cgd-lazy-mid:1")
    d.docker("run", "--name", "cgd-lazy-2", "--network", "none", "cgd-lazy-mid:1", "sh", "-c",
             "rm -rf /data/opq && mkdir /data/opq && echo new > /data/opq/new")
    d.docker("commit", "cgd-lazy-2", "cgd-lazy-top:1")
    d.docker("run", "--name", "cgd-lazy-3", "--network", "none", "cgd-lazy-top:1", "sh", "-c",
             "echo unpublished > /data/extra")
    d.docker("commit", "cgd-lazy-3", "cgd-lazy-more:1")
    refs = {}
    for local, remote in (("cgd-lazy-top:1", "cgd/lazy:1"), ("cgd-lazy-more:1", "cgd/lazy:2")):
        ref = f"{registry.address}/{remote}"
        d.docker("tag", local, ref)
        d.docker("push", ref)
        refs[remote] = ref
    cvmfs_root = cvmfs.root
    thin = os.path.join(TOP, ".venv/bin/cvmfs-thin")
    r = subprocess.run([thin, "--docker-host", d.host, "convert", refs["cgd/lazy:1"],
                        "--digests", "registry", *cvmfs.store_args(REPO),
                        "--tag", "cgd/lazy-thin:1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cvmfs.refresh(REPO)
    layers = registry_layers(d, refs["cgd/lazy:1"])
    assert len(layers) == 3
    for digest in layers:  # published under the registry's (compressed) digests
        h = digest.split(":", 1)[1]
        assert os.path.isdir(os.path.join(cvmfs_root, REPO, ".layers", h[:2], h, "layerfs"))
    thin_tar = os.path.join(work, "thin.tar")
    d.docker("save", "-o", thin_tar, "cgd/lazy-thin:1")
    return {"root": cvmfs_root, "refs": refs, "layers": layers, "thin_tar": thin_tar,
            "more_layers": registry_layers(d, refs["cgd/lazy:2"])}


@pytest.fixture(scope="module")
def stack(published, tmp_path_factory):
    need_grpc()
    for tool in ("containerd", "ctr", "runc"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (scripts/setup.sh)")
    lazypull = build_go_tool("lazypull")
    work = str(tmp_path_factory.mktemp("lazyctrd"))
    daemon = Daemon(os.path.join(work, "snapshotter"),
                    extra=["--cvmfs-root", published["root"], "--repositories", REPO]).start()
    containerd = Containerd(os.path.join(work, "containerd"), daemon.socket)
    try:
        containerd.start()
        yield daemon, containerd, lazypull
    finally:
        containerd.stop()
        daemon.stop()


def pull(containerd: Containerd, lazypull: str, ref: str) -> None:
    from containerd_harness import NAMESPACE

    r = subprocess.run([lazypull, "-address", containerd.address, "-namespace", NAMESPACE,
                        "-snapshotter", "cvmfs", "-plain-http", ref],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stderr}\n{containerd.log()}"


def run(containerd: Containerd, ref: str, script: str) -> str:
    return containerd.out("run", "--rm", "--snapshotter", "cvmfs", ref, "lazy-test",
                          "sh", "-c", script)


def test_a_published_image_is_pulled_without_its_layers(stack, published, registry):
    daemon, containerd, lazypull = stack
    log = Log(os.path.join(registry.root, "registry.log"))
    pull(containerd, lazypull, published["refs"]["cgd/lazy:1"])
    assert "/manifests/" in log.since()  # the registry was asked, for the manifest
    for digest in published["layers"]:
        assert log.blob_requests(digest) == [], f"layer {digest} was downloaded"
        # ... because the snapshotter answered with the published layer
        assert f"layer {digest}: remote snapshot" in daemon.log()
    out = run(containerd, published["refs"]["cgd/lazy:1"],
              "test ! -e /etc/group && echo group-deleted; cat /data/kept; ls /data/opq; "
              "find / -xdev -name '.wh.*' | wc -l")
    assert out.split() == ["group-deleted", "kept", "new", "0"]


def test_only_the_run_of_published_layers_from_the_bottom_is_skipped(stack, published,
                                                                     registry):
    """lazy:2 adds a layer that is not published: containerd downloads it (the access log
    shows it, so the check above can see a download) and not the published ones below."""
    _, containerd, lazypull = stack
    log = Log(os.path.join(registry.root, "registry.log"))
    pull(containerd, lazypull, published["refs"]["cgd/lazy:2"])
    extra = published["more_layers"][-1]
    assert extra not in published["layers"]
    assert log.blob_requests(extra), "the unpublished layer was not downloaded?"
    for digest in published["layers"]:
        assert log.blob_requests(digest) == []
    out = run(containerd, published["refs"]["cgd/lazy:2"], "cat /data/extra /data/kept")
    assert out.split() == ["unpublished", "kept"]


def test_a_thin_image_runs_through_ctr(stack, published):
    """The thin image cvmfs-thin made (one layer: thin.json) imported with ctr: its layer
    commits as the stack of the published layers, which the container sees."""
    _, containerd, _ = stack
    containerd.ctr("images", "import", "--snapshotter", "cvmfs", published["thin_tar"])
    out = run(containerd, "docker.io/cgd/lazy-thin:1",
              "test ! -e /etc/group && echo group-deleted; cat /data/kept; ls /data/opq; "
              "ls / | grep -c thin.json; find / -xdev -name '.wh.*' | wc -l")
    assert out.split() == ["group-deleted", "kept", "new", "0", "0"]
