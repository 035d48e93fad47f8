"""The snapshotter's metrics: lazy layers served from CVMFS vs left to containerd to
download, layer counts (regular, thin, lazy), active snapshots by repository, descriptor
and mount errors; through the daemon (`cvmfs-graphdriver snapshotter`, spoken to over
gRPC as containerd does) and in process. Every exposition is read with Prometheus' own
parser. The repository is a plain directory in DUCC's layout: what is counted does not
depend on CVMFS (test_remote.py and test_lazy_pull.py serve the layers from real CVMFS)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from typing import Dict, Tuple

import pytest
from metrics_tools import http_get, parse, value
from sntools import Client, need_grpc

from cvmfs_graphdriver import metrics, thin

REPO, GONE = "test.repo", "gone.repo"


def publish(root: str, name: str, files: Dict[str, str]) -> Tuple[str, str]:
    """A layer in DUCC's layout with its diff ID recorded (as cvmfs-thin publishes it);
    its hex digest and diff ID."""
    h = hashlib.sha256(f"metrics {name}".encode()).hexdigest()
    diff_id = "sha256:" + hashlib.sha256(f"diff {name}".encode()).hexdigest()
    fs = os.path.join(root, REPO, thin.layer_path(h))
    for path, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(fs, path)), exist_ok=True)
        with open(os.path.join(fs, path), "w") as f:
            f.write(content)
    meta = os.path.join(os.path.dirname(fs), thin.METADATA_DIR)
    os.makedirs(meta)
    with open(os.path.join(meta, thin.ORIGIN_FILE), "w") as f:
        json.dump({"diff_id": diff_id}, f)
    return h, diff_id


def thin_json(repo: str, h: str) -> str:
    return json.dumps({"version": "1.0", "layers": [
        {"digest": f"sha256:{h}", "url": f"cvmfs://{repo}/{thin.layer_path(h)}"}]})


def lazy_labels(h: str, ref: str) -> Dict[str, str]:
    from cvmfs_graphdriver.snapshotter import remote

    return {remote.TARGET_REF_LABEL: ref, remote.LAYER_DIGEST_LABEL: f"sha256:{h}"}


def test_the_snapshotter_daemon_exports_lazy_pulls(new_daemon, tmp_path) -> None:
    need_grpc()
    root = str(tmp_path / "cvmfs")
    h, diff_id = publish(root, "base", {"etc/hostname": "lazy\n"})
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    sockdir = tempfile.mkdtemp(prefix="cgdm-", dir="/tmp")
    msock = os.path.join(sockdir, "m.sock")
    d = new_daemon(extra=["--cvmfs-root", root, "--repositories", f"{REPO},{GONE}",
                          "--metrics-textfile-dir", str(textfile_dir),
                          "--metrics-socket", msock, "--metrics-interval", "1"]).start()
    c = Client(d.socket)
    try:
        # served from CVMFS: containerd is told the snapshot exists
        assert c.code(c.prepare, "extract-1", "", lazy_labels(h, diff_id))[0] == \
            "ALREADY_EXISTS"
        # not published: containerd downloads it (Prepare succeeds)
        missing = hashlib.sha256(b"not published").hexdigest()
        c.prepare("extract-2", diff_id, lazy_labels(missing, "sha256:" + "2" * 64))

        textfile = textfile_dir / metrics.TEXTFILE_NAMES[metrics.FACE_SNAPSHOTTER]
        deadline = time.monotonic() + 15
        while True:
            samples = parse(textfile.read_text()) if textfile.exists() else []
            if samples and value(samples, "cvmfs_graphdriver_lazy_layers_total",
                                 outcome="downloaded") == 1:
                break
            assert time.monotonic() < deadline, f"textfile: {samples}"
            time.sleep(0.2)
        assert all(lab["face"] == "snapshotter" for _, lab, _ in samples)
        assert value(samples, "cvmfs_graphdriver_lazy_layers_total", outcome="served") == 1
        assert value(samples, "cvmfs_graphdriver_layers", kind="lazy") == 1
        assert value(samples, "cvmfs_graphdriver_mounted_layers") == 1  # extract-2
        assert value(samples, "cvmfs_graphdriver_repository_mounts", repository=REPO) == 1
        assert value(samples, "cvmfs_graphdriver_repository_available", repository=REPO) == 1
        assert value(samples, "cvmfs_graphdriver_repository_available", repository=GONE) == 0
        assert not [n for n, _, _ in samples if "applydiff" in n]

        assert stat.S_IMODE(os.stat(msock).st_mode) == 0o600
        status, _, body = http_get(msock)
        assert status == 200
        assert value(parse(body), "cvmfs_graphdriver_lazy_layers_total", outcome="served") == 1
    finally:
        c.close()
        assert d.stop() == 0
        shutil.rmtree(sockdir, ignore_errors=True)
    assert not os.path.exists(msock)  # removed on the way out


def test_layer_counts_and_errors_in_process(tmp_path) -> None:
    need_grpc()
    from cvmfs_graphdriver.snapshotter import remote
    from cvmfs_graphdriver.snapshotter.errdefs import AlreadyExists, InvalidArgument
    from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

    root = str(tmp_path / "cvmfs")
    h, diff_id = publish(root, "lazy", {"a": "lazy"})
    h2, _ = publish(root, "thin", {"b": "thin"})
    sn = OverlaySnapshotter(str(tmp_path / "home"), sync_commits=False)
    try:
        cv = remote.install(sn, root, [REPO, GONE])
        before = {name: c.values() for name, c in metrics.COUNTERS.items()}

        def grew(counter: metrics.Counter, *labels: str) -> float:
            return counter.value(*labels) - before[counter.family.name].get(labels, 0.0)

        with pytest.raises(AlreadyExists):
            sn.prepare("extract-lazy", "", lazy_labels(h, diff_id))
        # a regular layer: unpacked here (containerd applies it, then commits)
        regular = sn.prepare("extract-reg", "")[0].source
        with open(os.path.join(regular, "f"), "w") as f:
            f.write("regular")
        sn.commit("sha256:" + "1" * 64, "extract-reg")
        # a thin image's layer, and one whose descriptor names a repository not allowed
        fs = sn.prepare("extract-thin", "")[0].source
        with open(os.path.join(fs, thin.DESCRIPTOR_NAME), "w") as f:
            f.write(thin_json(REPO, h2))
        sn.commit("thin", "extract-thin")
        fs = sn.prepare("extract-bad", "")[0].source
        with open(os.path.join(fs, thin.DESCRIPTOR_NAME), "w") as f:
            f.write(thin_json("other.repo", h2))
        with pytest.raises(InvalidArgument, match="not allowed"):
            sn.commit("bad", "extract-bad")
        sn.remove("extract-bad")
        assert grew(metrics.descriptor_errors) == 1
        # a container on the thin layer, and one on the lazy one
        sn.prepare("c-thin", "thin")
        sn.prepare("c-lazy", diff_id)
        # a published layer gone from the repository: the child cannot be mounted
        os.rename(os.path.join(root, REPO, thin.layer_path(h2)),
                  os.path.join(root, REPO, "moved"))
        with pytest.raises(Exception, match="missing"):
            sn.prepare("c-broken", "thin")
        assert grew(metrics.mount_errors) >= 1

        samples = parse(metrics.render(metrics.FACE_SNAPSHOTTER,
                                       remote.metric_samples(sn, cv)))
        for kind in ("regular", "thin", "lazy"):
            assert value(samples, "cvmfs_graphdriver_layers", kind=kind) == 1
        assert value(samples, "cvmfs_graphdriver_mounted_layers") == 2
        assert value(samples, "cvmfs_graphdriver_repository_mounts", repository=REPO) == 2
        assert value(samples, "cvmfs_graphdriver_repository_mounts", repository=GONE) == 0
        assert grew(metrics.lazy_layers, metrics.LAZY_SERVED) == 1
    finally:
        sn.close()


def test_the_gauges_never_wait_for_the_metadata_lock(tmp_path) -> None:
    """The metrics thread reads the gauges in a read-only connection of its own: while a
    request holds the MetaStore's lock (every gRPC request takes it), they are read all
    the same, and reading them does not make requests wait."""
    need_grpc()
    import threading

    from cvmfs_graphdriver.snapshotter import remote
    from cvmfs_graphdriver.snapshotter.errdefs import AlreadyExists
    from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

    root = str(tmp_path / "cvmfs")
    h, diff_id = publish(root, "lazy", {"a": "lazy"})
    sn = OverlaySnapshotter(str(tmp_path / "home"), sync_commits=False)
    held, release = threading.Event(), threading.Event()

    def request() -> None:  # a long request inside the MetaStore's lock
        with sn.ms.transaction(write=True):
            held.set()
            release.wait(10)

    try:
        cv = remote.install(sn, root, [REPO])
        with pytest.raises(AlreadyExists):
            sn.prepare("extract-lazy", "", lazy_labels(h, diff_id))
        sn.prepare("c", diff_id)
        holder = threading.Thread(target=request, daemon=True)
        holder.start()
        assert held.wait(5)
        out: Dict[str, object] = {}
        reader = threading.Thread(target=lambda: out.update(s=remote.metric_samples(sn, cv)),
                                  daemon=True)
        reader.start()
        reader.join(3)
        done = not reader.is_alive()
        release.set()
        holder.join(5)
        reader.join(5)
        assert done, "the gauges waited for the MetaStore's lock"
        samples = parse(metrics.render(metrics.FACE_SNAPSHOTTER, out["s"]))  # type: ignore
        assert value(samples, "cvmfs_graphdriver_layers", kind="lazy") == 1
        assert value(samples, "cvmfs_graphdriver_mounted_layers") == 1
        assert value(samples, "cvmfs_graphdriver_repository_mounts", repository=REPO) == 1
    finally:
        release.set()
        sn.close()


def test_the_metrics_and_status_tell_lazy_from_thin_by_one_rule(tmp_path) -> None:
    """A thin image's layer that containerd's unpacker prepared with the layer-digest
    label (it labels every layer so) is a thin layer to the metrics and to `status`
    alike (remote.is_lazy); a lazy pull is lazy to both."""
    need_grpc()
    from cvmfs_graphdriver import status
    from cvmfs_graphdriver.snapshotter import remote
    from cvmfs_graphdriver.snapshotter.errdefs import AlreadyExists
    from cvmfs_graphdriver.snapshotter.overlay import OverlaySnapshotter

    root = str(tmp_path / "cvmfs")
    h, diff_id = publish(root, "lazy", {"a": "lazy"})
    h2, _ = publish(root, "thin", {"b": "thin"})
    sn = OverlaySnapshotter(str(tmp_path / "home"), sync_commits=False)
    try:
        cv = remote.install(sn, root, [REPO])
        with pytest.raises(AlreadyExists):
            sn.prepare("extract-lazy", "", lazy_labels(h, diff_id))
        unpacker = {remote.LAYER_DIGEST_LABEL: "sha256:" + "9" * 64}
        fs = sn.prepare("extract-thin", "", unpacker)[0].source
        with open(os.path.join(fs, thin.DESCRIPTOR_NAME), "w") as f:
            f.write(thin_json(REPO, h2))
        sn.commit("thin", "extract-thin", unpacker)
        samples = parse(metrics.render(metrics.FACE_SNAPSHOTTER,
                                       remote.metric_samples(sn, cv)))
        st = status.snapshotter_status(sn.layout.home, disk=False)
        assert (st.thin, st.lazy) == (1, 1)
        assert value(samples, "cvmfs_graphdriver_layers", kind="thin") == 1
        assert value(samples, "cvmfs_graphdriver_layers", kind="lazy") == 1
    finally:
        sn.close()
