#!/usr/bin/python
# Copyright: cvmfs-graphdriver contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Merge keys into Docker's daemon.json, keeping every key the module is not told about."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: docker_daemon_json
short_description: Merge keys into Docker's daemon.json without dropping the site's own keys
version_added: "0.1.0"
description:
  - Reads Docker's C(daemon.json) (a missing or empty file counts as C({})), sets the
    top-level keys given in O(settings), removes the keys named in O(remove), and writes
    the file back only when the resulting configuration differs from what is there.
  - Keys that are in neither O(settings) nor O(remove) are kept as they are, so a site's
    own settings (log drivers, registry mirrors, data-root, ...) survive.
  - The comparison is on the parsed JSON, not on the text, so re-formatting alone never
    counts as a change. When a change is written, the file is rendered with two-space
    indentation, keys in their previous order and new keys appended.
  - Top-level keys are replaced as a whole; a nested object given in O(settings)
    replaces the object in the file.
  - Supports check mode and diff mode; the diff shows the file's text before and after.
options:
  path:
    description: Path of the file.
    type: path
    default: /etc/docker/daemon.json
  settings:
    description: Top-level keys to set, with their JSON values.
    type: dict
    default: {}
  remove:
    description: Top-level keys to remove if present. A key may not be in both O(settings) and O(remove).
    type: list
    elements: str
    default: []
  mode:
    description: Permissions of the file when the module creates or rewrites it.
    type: raw
    default: "0644"
  backup:
    description: Keep a timestamped copy of the previous file when it is rewritten.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
author:
  - cvmfs-graphdriver contributors
"""

EXAMPLES = r"""
- name: Use the cvmfs graph-driver plugin, keep the site's other keys
  cvmfs_graphdriver.provisioning.docker_daemon_json:
    settings:
      storage-driver: cvmfs
      experimental: true

- name: Drop a key the site no longer wants
  cvmfs_graphdriver.provisioning.docker_daemon_json:
    remove: [storage-opts]
"""

RETURN = r"""
config:
  description: The configuration after the module ran (what would be written in check mode).
  returned: success
  type: dict
  sample: {"experimental": true, "log-driver": "journald", "storage-driver": "cvmfs"}
previous:
  description: The configuration found before the module ran (C({}) when the file was missing).
  returned: success
  type: dict
  sample: {"log-driver": "journald", "storage-driver": "overlay2"}
changed_keys:
  description: Top-level keys that were added, changed or removed, sorted.
  returned: success
  type: list
  elements: str
  sample: ["experimental", "storage-driver"]
backup_file:
  description: Name of the backup file, when O(backup) made one.
  returned: changed and backup is true and the file existed
  type: str
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule


def parse(text, path="daemon.json"):
    """Parse daemon.json text; an empty (or whitespace-only) file is an empty object."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def merge(current, settings, remove):
    """Return (new, changed_keys): `current` with `settings` set and `remove` deleted.

    Key order is kept: existing keys stay where they are, new keys follow in the order given.
    """
    both = sorted(set(settings) & set(remove))
    if both:
        raise ValueError("keys both set and removed: " + ", ".join(both))
    new = dict(current)
    for key, value in settings.items():
        new[key] = value
    for key in remove:
        new.pop(key, None)
    changed = sorted(k for k in set(current) | set(new)
                     if k not in new or k not in current or current[k] != new[k])
    return new, changed


def render(config):
    """The text written to the file."""
    return json.dumps(config, indent=2) + "\n"


def run(module):
    path = module.params["path"]
    result = {"changed": False, "path": path}
    exists = os.path.exists(path)
    text = ""
    if exists:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            module.fail_json(msg=f"cannot read {path}: {e}", **result)
    try:
        current = parse(text, path)
        new, changed_keys = merge(current, module.params["settings"], module.params["remove"])
    except ValueError as e:
        module.fail_json(msg=str(e), **result)

    result.update(config=new, previous=current, changed_keys=changed_keys)
    if not changed_keys and exists:
        return result

    after = render(new)
    result["changed"] = True
    if module._diff:
        result["diff"] = {"before": text, "after": after,
                          "before_header": path if exists else f"{path} (absent)",
                          "after_header": path}
    if module.check_mode:
        return result

    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        module.fail_json(msg=f"directory {directory} does not exist", **result)
    if exists and module.params["backup"]:
        result["backup_file"] = module.backup_local(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.ansible-tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(after)
    module.atomic_move(tmp, path)
    file_args = module.load_file_common_arguments({"path": path, "mode": module.params["mode"]})
    module.set_fs_attributes_if_different(file_args, False)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", default="/etc/docker/daemon.json"),
            settings=dict(type="dict", default={}),
            remove=dict(type="list", elements="str", default=[]),
            mode=dict(type="raw", default="0644"),
            backup=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
