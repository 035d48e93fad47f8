"""Shared by the fleet scenario's testinfra tests (run on the controller)."""

from __future__ import annotations

import json
import os

EPHEMERAL = os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]
REPO = "thin.fleet.example.org"


def images() -> dict:
    """The registry's address, the source image and the thin image (prepare.yml)."""
    with open(os.path.join(EPHEMERAL, "fleet", "images.json")) as f:
        return json.load(f)


def run_ok(host, *argv: str) -> str:
    """Run argv on the node, fail the test with its output unless it exits 0."""
    cmd = host.run(" ".join("'" + a.replace("'", "'\\''") + "'" for a in argv))
    assert cmd.rc == 0, f"{argv} exited {cmd.rc}\nstdout: {cmd.stdout}\nstderr: {cmd.stderr}"
    return cmd.stdout
