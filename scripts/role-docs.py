#!/usr/bin/env python3
"""Write each role's variable table into its README from meta/argument_specs.yml, and
check that argument_specs.yml and defaults/main.yml agree (same variables, same
defaults, every variable typed and described).

    .venv/bin/python scripts/role-docs.py          # rewrite the tables
    .venv/bin/python scripts/role-docs.py --check  # fail if a README is out of date

The table goes between the markers <!-- BEGIN VARIABLES --> and <!-- END VARIABLES -->;
everything else in a README is written by hand.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

ROLES = pathlib.Path(__file__).resolve().parent.parent / "roles"
BEGIN, END = "<!-- BEGIN VARIABLES -->", "<!-- END VARIABLES -->"


def cell(text: str) -> str:
    text = re.sub(r"[OV]\(([^)]+)\)", r"`\1`", " ".join(str(text).split()))
    return text.replace("|", "\\|")


def default(spec: dict) -> str:
    if "default" not in spec:
        return "(required)"
    value = spec["default"]
    shown = value if isinstance(value, str) else json.dumps(value)
    return f"`{shown}`" if shown != "" else '`""`'


def table(specs: dict) -> str:
    options = specs["argument_specs"]["main"]["options"]
    rows = ["| variable | type | default | description |", "| --- | --- | --- | --- |"]
    for name, spec in options.items():
        kind = spec.get("type", "str")
        if kind == "list" and "elements" in spec:
            kind = f"list of {spec['elements']}"
        desc = spec.get("description", "")
        if isinstance(desc, list):
            desc = " ".join(desc)
        if "choices" in spec:
            desc += " One of: " + ", ".join(f"`{c}`" for c in spec["choices"]) + "."
        rows.append(f"| `{name}` | {kind} | {cell(default(spec))} | {cell(desc)} |")
    return "\n".join(rows)


def consistency(role: str, specs: dict, defaults: dict) -> list:
    options = specs["argument_specs"]["main"]["options"]
    problems = []
    for name in sorted(set(options) ^ set(defaults)):
        where = "defaults/main.yml" if name in defaults else "meta/argument_specs.yml"
        problems.append(f"{role}: {name} is only in {where}")
    for name, spec in options.items():
        if not name.startswith(role + "_"):
            problems.append(f"{role}: {name} lacks the role's prefix")
        for key in ("type", "default", "description"):
            if key not in spec:
                problems.append(f"{role}: {name} has no {key} in meta/argument_specs.yml")
        if name in defaults and spec.get("default") != defaults[name]:
            problems.append(f"{role}: {name} defaults to {defaults[name]!r} in defaults/main.yml"
                            f" but {spec.get('default')!r} in meta/argument_specs.yml")
    return problems


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    problems = []
    for role in sorted(p for p in ROLES.iterdir() if p.is_dir()):
        readme = role / "README.md"
        specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
        problems += consistency(role.name, specs,
                                yaml.safe_load((role / "defaults" / "main.yml").read_text()))
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            print(f"{readme}: lacks the {BEGIN} / {END} markers", file=sys.stderr)
            return 1
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = f"{head}{BEGIN}\n{table(specs)}\n{END}{tail}"
        if new != text:
            stale.append(readme)
            if not check:
                readme.write_text(new)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    if check and stale:
        print("out of date (run scripts/role-docs.py): " + ", ".join(map(str, stale)),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
