"""Run one of the collection's modules on localhost through `ansible`, as a play would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

COLLECTIONS_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 5))


def run_module(fqcn: str, args: dict, *flags: str) -> dict:
    """The module's result for `args` (flags such as --check, --diff go to `ansible`)."""
    env = dict(os.environ,
               ANSIBLE_COLLECTIONS_PATH=COLLECTIONS_ROOT,
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
               ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
               ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    ansible = os.path.join(os.path.dirname(sys.executable), "ansible")
    proc = subprocess.run([ansible, "localhost", "-m", fqcn, "-a", json.dumps(args), *flags],
                          env=env, capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"ansible printed no JSON (rc {proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}") from None
    return out["plays"][0]["tasks"][0]["hosts"]["localhost"]
