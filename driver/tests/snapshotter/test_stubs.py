"""The committed gRPC stubs are exactly what scripts/gen-protos.sh makes from containerd's
protos, and they serve the method paths containerd calls."""

from __future__ import annotations

import os
import shutil
import subprocess

from sntools import need, need_grpc

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
API = os.path.join(TOP, "driver", "src", "cvmfs_graphdriver", "snapshotter", "api")
SCRIPT = os.path.join(TOP, "scripts", "gen-protos.sh")
PROTOS = "/usr/share/gocode/src/github.com/containerd/containerd/api/services/snapshots/v1"


def test_committed_stubs_equal_a_fresh_generation(tmp_path):
    need(os.path.isdir(PROTOS) or os.geteuid() == 0,
         "containerd's protos are missing (golang-github-containerd-containerd-dev) and "
         "installing them needs root")
    need(shutil.which("python3") is not None, "python3 is needed to make the tools venv")
    out = tmp_path / "api"
    r = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, timeout=900)
    need(r.returncode == 0, f"scripts/gen-protos.sh failed (PyPI reachable?):\n{r.stderr[-3000:]}")
    generated = sorted(os.listdir(out))
    committed = sorted(f for f in os.listdir(API) if f not in ("__init__.py", "__pycache__"))
    assert generated == committed
    for name in generated:
        with open(out / name, encoding="utf-8") as a, \
                open(os.path.join(API, name), encoding="utf-8") as b:
            assert a.read() == b.read(), f"{name} differs: run scripts/gen-protos.sh"


def test_method_paths_are_containerds():
    need_grpc()
    from cvmfs_graphdriver.snapshotter.api import snapshots_pb2

    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(m.name for m in service.methods) == sorted(
        ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
         "Cleanup"])
    assert snapshots_pb2.Info.DESCRIPTOR.fields_by_name["created_at"].number == 4
    mount = snapshots_pb2.PrepareSnapshotResponse.DESCRIPTOR.fields_by_name["mounts"]
    assert mount.message_type.full_name == "containerd.types.Mount"
    assert [v.name for v in snapshots_pb2.Kind.DESCRIPTOR.values] == [
        "UNKNOWN", "VIEW", "ACTIVE", "COMMITTED"]
