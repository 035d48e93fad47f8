"""containerd_proxy_plugin: the table edit, and the module run by Ansible (check, diff)."""

from __future__ import annotations

import ansible_run
import pytest
import tomllib
from ansible_collections.cvmfs_graphdriver.provisioning.plugins.modules import (
    containerd_proxy_plugin as mod,
)

FQCN = "cvmfs_graphdriver.provisioning.containerd_proxy_plugin"
SOCK = "/run/cvmfs-graphdriver/snapshotter.sock"
WANT = {"type": "snapshot", "address": SOCK}

# Debian 12's /etc/containerd/config.toml, plus a site comment and another proxy plugin.
DEBIAN = """version = 2

# site: keep this comment
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
"""


def test_adds_the_table_and_keeps_everything_else():
    new, previous = mod.update(DEBIAN, "cvmfs", WANT)
    assert previous == {}
    assert new.startswith(DEBIAN)
    doc = tomllib.loads(new)
    assert doc["proxy_plugins"]["cvmfs"] == WANT
    assert doc["proxy_plugins"]["stargz"]["type"] == "snapshot"
    assert doc["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"] == "/usr/lib/cni"
    assert mod.update(new, "cvmfs", WANT) == (new, WANT)  # a second run changes nothing


def test_rewrites_a_differing_table_in_place():
    old = DEBIAN.replace("[proxy_plugins.stargz]", '[proxy_plugins."cvmfs"]\n'
                         '    type = "snapshot"\n    address = "/old.sock"\n\n'
                         "  [proxy_plugins.stargz]")
    new, previous = mod.update(old, "cvmfs", WANT)
    assert previous == {"type": "snapshot", "address": "/old.sock"}
    doc = tomllib.loads(new)
    assert doc["proxy_plugins"]["cvmfs"] == WANT
    assert doc["proxy_plugins"]["stargz"]["address"].endswith("stargz-grpc.sock")
    # the header stays as the site wrote it; only the address line changed
    assert new.count('[proxy_plugins."cvmfs"]') == 1 and "/old.sock" not in new


def test_empty_or_missing_file_gets_just_the_table():
    new, _ = mod.update("", "cvmfs", WANT)
    assert tomllib.loads(new) == {"proxy_plugins": {"cvmfs": WANT}}


def test_absent_removes_only_that_table():
    with_it, _ = mod.update(DEBIAN, "cvmfs", WANT)
    new, previous = mod.update(with_it, "cvmfs", None)
    assert previous == WANT
    assert "cvmfs" not in tomllib.loads(new)["proxy_plugins"]
    assert tomllib.loads(new)["proxy_plugins"]["stargz"]
    assert mod.update(DEBIAN, "cvmfs", None) == (DEBIAN, {})


@pytest.mark.parametrize("text,what", [
    ('proxy_plugins.cvmfs.type = "snapshot"\n', "dotted key"),
    ('[proxy_plugins]\n  cvmfs = { type = "snapshot", address = "/x" }\n', "inline table"),
])
def test_forms_it_does_not_manage_are_refused(text, what):
    with pytest.raises(ValueError, match=what):
        mod.update(text, "cvmfs", WANT)


def test_module_writes_then_changes_nothing_check_and_diff(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(DEBIAN)
    args = {"path": str(path), "name": "cvmfs", "address": SOCK}
    checked = ansible_run.run_module(FQCN, args, "--check", "--diff")
    assert checked["changed"] and path.read_text() == DEBIAN  # check mode writes nothing
    assert "[proxy_plugins.cvmfs]" in checked["diff"]["after"]
    first = ansible_run.run_module(FQCN, args)
    assert first["changed"] and first["plugin"] == WANT
    assert tomllib.loads(path.read_text())["proxy_plugins"]["cvmfs"] == WANT
    again = ansible_run.run_module(FQCN, args)
    assert not again["changed"] and again["previous"] == WANT


def test_module_refuses_without_touching_the_file(tmp_path):
    path = tmp_path / "config.toml"
    text = 'version = 2\nproxy_plugins.cvmfs.type = "snapshot"\n'
    path.write_text(text)
    result = ansible_run.run_module(FQCN, {"path": str(path), "name": "cvmfs", "address": SOCK})
    assert result.get("failed") and "dotted key" in result["msg"]
    assert path.read_text() == text


def test_a_sites_other_keys_in_the_table_stay():
    old = ('[proxy_plugins.cvmfs]\n  type = "snapshot"\n  address = "/old.sock"\n'
           '  platform = "linux/amd64"  # set by the site\n')
    new, previous = mod.update(old, "cvmfs", WANT)
    assert previous == {"type": "snapshot", "address": "/old.sock", "platform": "linux/amd64"}
    doc = tomllib.loads(new)["proxy_plugins"]["cvmfs"]
    assert doc == {**WANT, "platform": "linux/amd64"}
    assert "# set by the site" in new
    assert mod.update(new, "cvmfs", WANT)[0] == new  # then nothing to change
    # a key missing from the table is added after its header
    partial, _ = mod.update('[proxy_plugins.cvmfs]\n  platform = "x"\n', "cvmfs", WANT)
    assert tomllib.loads(partial)["proxy_plugins"]["cvmfs"] == {**WANT, "platform": "x"}
