"""docker_daemon_json: the merge logic, and the module run by Ansible (check and diff mode)."""

from __future__ import annotations

import json

import ansible_run
import pytest
from ansible_collections.cvmfs_graphdriver.provisioning.plugins.modules import docker_daemon_json as mod

FQCN = "cvmfs_graphdriver.provisioning.docker_daemon_json"


# ------------------------------------------------------------------ pure logic


def test_parse_empty_file_is_an_empty_object():
    assert mod.parse("") == {}
    assert mod.parse("  \n") == {}


def test_parse_rejects_invalid_json_naming_the_file():
    with pytest.raises(ValueError, match="/etc/docker/daemon.json is not valid JSON"):
        mod.parse("{", "/etc/docker/daemon.json")


def test_parse_rejects_a_non_object():
    with pytest.raises(ValueError, match="must hold a JSON object, found list"):
        mod.parse("[1]")


def test_merge_keeps_other_keys_and_their_order():
    current = {"log-driver": "journald", "storage-driver": "overlay2", "debug": True}
    new, changed = mod.merge(current, {"storage-driver": "cvmfs", "experimental": True}, [])
    assert list(new) == ["log-driver", "storage-driver", "debug", "experimental"]
    assert new == {"log-driver": "journald", "storage-driver": "cvmfs", "debug": True,
                   "experimental": True}
    assert changed == ["experimental", "storage-driver"]
    assert current["storage-driver"] == "overlay2", "the input must not be modified"


def test_merge_without_difference_changes_nothing():
    current = {"storage-driver": "cvmfs", "log-opts": {"max-size": "10m"}}
    new, changed = mod.merge(current, {"log-opts": {"max-size": "10m"}}, ["absent-key"])
    assert new == current and changed == []


def test_merge_replaces_nested_objects_whole_and_removes_keys():
    current = {"log-opts": {"max-size": "10m", "max-file": "3"}, "storage-opts": ["a"]}
    new, changed = mod.merge(current, {"log-opts": {"max-size": "1m"}}, ["storage-opts"])
    assert new == {"log-opts": {"max-size": "1m"}}
    assert changed == ["log-opts", "storage-opts"]


def test_merge_refuses_a_key_both_set_and_removed():
    with pytest.raises(ValueError, match="both set and removed: bridge"):
        mod.merge({}, {"bridge": "none"}, ["bridge"])


def test_render_is_stable_json_with_a_final_newline():
    text = mod.render({"b": 1, "a": [True, None]})
    assert text == '{\n  "b": 1,\n  "a": [\n    true,\n    null\n  ]\n}\n'
    assert json.loads(text) == {"b": 1, "a": [True, None]}


# ------------------------------------------------------- the module under Ansible


def run_module(args: dict, *flags: str) -> dict:
    return ansible_run.run_module(FQCN, args, *flags)


@pytest.fixture
def daemon_json(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"log-driver": "journald",\n "storage-driver": "overlay2"}\n')
    return path


def test_module_merges_and_keeps_site_keys(daemon_json):
    result = run_module({"path": str(daemon_json),
                         "settings": {"storage-driver": "cvmfs", "experimental": True}})
    assert result["changed"] is True
    assert result["changed_keys"] == ["experimental", "storage-driver"]
    assert json.loads(daemon_json.read_text()) == {
        "log-driver": "journald", "storage-driver": "cvmfs", "experimental": True}
    assert oct(daemon_json.stat().st_mode & 0o777) == "0o644"


def test_module_second_run_changes_nothing(daemon_json):
    args = {"path": str(daemon_json), "settings": {"storage-driver": "cvmfs"}}
    assert run_module(args)["changed"] is True
    text = daemon_json.read_text()
    again = run_module(args)
    assert again["changed"] is False
    assert daemon_json.read_text() == text


def test_module_ignores_formatting_only_differences(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"storage-driver":"cvmfs","experimental":true}')
    result = run_module({"path": str(path),
                         "settings": {"experimental": True, "storage-driver": "cvmfs"}})
    assert result["changed"] is False
    assert path.read_text() == '{"storage-driver":"cvmfs","experimental":true}'


def test_module_check_mode_reports_but_does_not_write(daemon_json):
    before = daemon_json.read_text()
    result = run_module({"path": str(daemon_json), "settings": {"storage-driver": "cvmfs"}},
                        "--check", "--diff")
    assert result["changed"] is True
    assert daemon_json.read_text() == before
    assert result["diff"]["before"] == before
    assert json.loads(result["diff"]["after"]) == {"log-driver": "journald",
                                                   "storage-driver": "cvmfs"}
    assert result["config"]["storage-driver"] == "cvmfs"
    assert result["previous"]["storage-driver"] == "overlay2"


def test_module_check_mode_on_a_missing_file(tmp_path):
    path = tmp_path / "daemon.json"
    result = run_module({"path": str(path), "settings": {"bridge": "none"}}, "--check", "--diff")
    assert result["changed"] is True and not path.exists()
    assert result["diff"]["before"] == ""
    assert result["diff"]["before_header"].endswith("(absent)")


def test_module_creates_a_missing_file(tmp_path):
    path = tmp_path / "daemon.json"
    result = run_module({"path": str(path), "settings": {"bridge": "none", "iptables": False}})
    assert result["changed"] is True
    assert json.loads(path.read_text()) == {"bridge": "none", "iptables": False}


def test_module_empty_file_counts_as_empty_object(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text("")
    assert run_module({"path": str(path)})["changed"] is False, "dockerd reads it as {}"
    assert path.read_text() == ""
    assert run_module({"path": str(path), "settings": {"debug": True}})["changed"] is True
    assert path.read_text() == '{\n  "debug": true\n}\n'


def test_module_removes_keys_and_backs_up(daemon_json):
    result = run_module({"path": str(daemon_json), "remove": ["log-driver"], "backup": True})
    assert result["changed"] is True
    assert json.loads(daemon_json.read_text()) == {"storage-driver": "overlay2"}
    with open(result["backup_file"]) as backup:
        assert "journald" in backup.read()


def test_module_fails_on_invalid_json_without_touching_it(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text("{not json")
    result = run_module({"path": str(path), "settings": {"bridge": "none"}})
    assert result.get("failed") is True
    assert "is not valid JSON" in result["msg"]
    assert path.read_text() == "{not json"
