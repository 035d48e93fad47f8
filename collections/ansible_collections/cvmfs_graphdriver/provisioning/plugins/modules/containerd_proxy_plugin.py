#!/usr/bin/python
# Copyright: cvmfs-graphdriver contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Manage one [proxy_plugins.NAME] table in containerd's config.toml, keeping the rest."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: containerd_proxy_plugin
short_description: Declare an external snapshotter in containerd's config.toml, keeping the site's settings
version_added: "0.2.0"
description:
  - Ensures containerd's configuration file has (or, with O(state=absent), lacks) the table
    C([proxy_plugins.NAME]) with C(type) and C(address), which makes containerd load an
    external snapshotter (or content store) that serves its gRPC API on a unix socket.
  - Every other line of the file is kept as it is, comments included; the table is
    appended at the end when missing; when it is there, only its C(type) and C(address)
    lines are set (other keys the site gave the plugin stay). A missing file counts as
    empty (containerd's defaults).
  - The file is changed only when the table's keys differ from what is wanted, so a
    second run reports no change.
  - A file that names the plugin in a way this module does not manage (a dotted key such
    as C(proxy_plugins.NAME.type), or an inline table under C([proxy_plugins])) fails with
    a message instead of being rewritten. Where Python's C(tomllib) exists (3.11+), the
    result is parsed before it is written.
  - Supports check mode and diff mode.
options:
  path:
    description: containerd's configuration file.
    type: path
    default: /etc/containerd/config.toml
  name:
    description: The plugin's name (C(ctr plugins ls) shows it; Docker and the CRI select it by name).
    type: str
    required: true
  type:
    description: What the plugin provides.
    type: str
    choices: [snapshot, content]
    default: snapshot
  address:
    description: The unix socket the plugin serves on. Required with O(state=present).
    type: path
  state:
    description: Whether the table should be there.
    type: str
    choices: [present, absent]
    default: present
  mode:
    description: Permissions of the file when the module creates or rewrites it.
    type: raw
    default: "0644"
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
author:
  - cvmfs-graphdriver contributors
"""

EXAMPLES = r"""
- name: Let containerd load the cvmfs snapshotter
  cvmfs_graphdriver.provisioning.containerd_proxy_plugin:
    name: cvmfs
    address: /run/cvmfs-graphdriver/snapshotter.sock
  notify: Restart containerd
"""

RETURN = r"""
previous:
  description: The table's keys before the module ran (C({}) when it was missing).
  returned: success
  type: dict
  sample: {}
plugin:
  description: The table's string keys after the module ran (C({}) with O(state=absent)).
  returned: success
  type: dict
  sample: {"type": "snapshot", "address": "/run/cvmfs-graphdriver/snapshotter.sock"}
"""

import json
import os
import re

from ansible.module_utils.basic import AnsibleModule

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=\s*"((?:[^"\\]|\\.)*)"\s*(#.*)?$')


def _table_name(line):
    """The dotted name of a table header line ("" for anything else; None for [[...]])."""
    if line.lstrip().startswith("[["):
        return None
    m = _HEADER.match(line)
    if not m:
        return ""
    return ".".join(p.strip().strip('"') for p in m.group(1).split("."))


def find_table(lines, name):
    """(start, end) line indexes of [proxy_plugins.NAME] (header to before the next
    table), or None. Fails on forms this module does not manage."""
    wanted = f"proxy_plugins.{name}"
    start = None
    current = ""
    for i, line in enumerate(lines):
        header = _table_name(line)
        if header is None or header:
            if start is not None:
                return start, i
            current = header if header is not None else "[[array of tables]]"
            if header == wanted:
                start = i
            continue
        stripped = line.split("#", 1)[0].strip()
        if current == "" and re.match(rf'^"?proxy_plugins"?\s*\.\s*"?{re.escape(name)}"?\s*[.=]',
                                      stripped):
            raise ValueError(f"the file sets proxy_plugins.{name} with a dotted key; "
                             f"replace it with a [proxy_plugins.{name}] table first")
        if current == "proxy_plugins" and re.match(rf'^"?{re.escape(name)}"?\s*=', stripped):
            raise ValueError(f"the file sets {name} as an inline table under [proxy_plugins]; "
                             f"replace it with a [proxy_plugins.{name}] table first")
    return (start, len(lines)) if start is not None else None


def table_keys(lines):
    """The string keys of a table body (the only kind a proxy plugin has)."""
    keys = {}
    for line in lines:
        m = _KEY.match(line)
        if m:
            keys[m.group(2)] = json.loads(f'"{m.group(3)}"')
    return keys


def render_table(name, keys):
    body = "".join(f"  {k} = {json.dumps(v)}\n" for k, v in keys.items())
    return [f"[proxy_plugins.{name}]\n"] + body.splitlines(keepends=True)


def update(text, name, keys):
    """Return (new_text, previous_keys). `keys` None removes the table; otherwise the
    table gets those keys, and any other key the site put in it stays as it is."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    span = find_table(lines, name)
    previous = table_keys(lines[span[0] + 1:span[1]]) if span else {}
    if keys is None:
        if span is None:
            return text, previous
        body = lines[span[0]:span[1]]
        # Keep a comment or blank lines that separate it from the next table.
        tail = len(body)
        while tail > 1 and not body[tail - 1].strip():
            tail -= 1
        return "".join(lines[:span[0]] + body[tail:] + lines[span[1]:]), previous
    if all(previous.get(k) == v for k, v in keys.items()):
        return text, previous
    if span is None:
        sep = ["\n"] if lines and lines[-1].strip() else []
        return "".join(lines + sep + render_table(name, keys)), previous
    body = lines[span[0] + 1:span[1]]
    todo = dict(keys)
    for i, line in enumerate(body):
        m = _KEY.match(line)
        if m and m.group(2) in todo:
            indent = line[:len(line) - len(line.lstrip())]
            body[i] = f"{indent}{m.group(2)} = {json.dumps(todo.pop(m.group(2)))}\n"
    added = [f"  {k} = {json.dumps(v)}\n" for k, v in todo.items()]
    return "".join(lines[:span[0] + 1] + added + body + lines[span[1]:]), previous


def check_parses(text, name, keys):
    try:
        import tomllib
    except ImportError:  # Python < 3.11 on the node: the line-based edit stands alone
        return
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"the result would not be valid TOML: {e}") from None
    got = doc.get("proxy_plugins", {}).get(name)
    if keys is None and got is not None or keys is not None and (
            not isinstance(got, dict) or any(got.get(k) != v for k, v in keys.items())):
        raise ValueError(f"the result would set proxy_plugins.{name} to {got!r}, not {keys!r}")


def run(module):
    p = module.params
    path, name = p["path"], p["name"]
    if p["state"] == "present" and not p["address"]:
        module.fail_json(msg="address is required with state=present")
    keys = {"type": p["type"], "address": p["address"]} if p["state"] == "present" else None
    result = {"changed": False, "path": path}
    text = ""
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            module.fail_json(msg=f"cannot read {path}: {e}", **result)
    try:
        new, previous = update(text, name, keys)
        if new != text:
            check_parses(new, name, keys)
    except ValueError as e:
        module.fail_json(msg=f"{path}: {e}", **result)
    result.update(previous=previous,
                  plugin={**previous, **keys} if keys is not None else {})
    if new == text:
        module.exit_json(**result)
    result["changed"] = True
    if module._diff:
        result["diff"] = {"before": text, "after": new, "before_header": path,
                          "after_header": path}
    if not module.check_mode:
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(new)
            module.set_mode_if_different(tmp, p["mode"], False)
            module.atomic_move(tmp, path)
        except OSError as e:
            module.fail_json(msg=f"cannot write {path}: {e}", **result)
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/etc/containerd/config.toml"},
            "name": {"type": "str", "required": True},
            "type": {"type": "str", "choices": ["snapshot", "content"], "default": "snapshot"},
            "address": {"type": "path"},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "mode": {"type": "raw", "default": "0644"},
        },
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()
