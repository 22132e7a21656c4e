"""Generate docs/configuration.md, the reference of every `SATConfig` setting, from the dataclass itself.

Each field's help, group, allowed values and default come from ``sat_trainer/config.py`` (annotations and field
metadata), so the reference cannot drift from the code: ``tests/test_config_reference.py`` fails when the file
differs from ``render()``.

    python scripts/config_reference.py            # print the reference
    python scripts/config_reference.py --write    # rewrite docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 if docs/configuration.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sat_trainer.config import GROUPS, FieldDoc, field_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
COMMAND = "python scripts/config_reference.py --write"

INTRO = f"""# SAT settings

<!-- Generated from sat_trainer/config.py by `{COMMAND}`: edit the field metadata there, not this file. -->

Every setting of Sparsity-Accelerated Training is a field of `sat_trainer.SATConfig`. All are optional: the
defaults below train with SAT as shipped. A wrong key, a value of the wrong type or out of its range, or a
combination that is refused raises one `SATConfigError` naming the key, the value and what is allowed, when the
config is built and before any model is touched.

## Setting them

- In a `sat-train` scenario, under `sat:` (leave the block out, or write `sat: null`, to train dense):

  ```yaml
  sat:
    omission_rate: 0.5
    targets: [mlp]
  ```

  or on the command line, over the file: `sat-train cpt --config run.yaml --set sat.omission_rate=0.25`.
- In a YAML file of SAT settings alone, at the top level or under `sat:`: `SATConfig.from_yaml("sat.yaml")`.
- In Python: `SATConfig(omission_rate=0.5, targets=["mlp"])`, or the same keys as a dict:
  `SATConfig.from_dict({{"omission_rate": 0.5}})`. `SATCallback` and `apply_sat` take a `SATConfig`, such a dict,
  a YAML path, or `None` (all defaults); `SATConfig.to_dict()` gives the dict back.
"""


def render() -> str:
    """The whole of docs/configuration.md: how to set the fields, then one table per group of `GROUPS`."""
    docs = field_docs()
    parts = [INTRO, "## Groups\n", *(f"- [{group}](#{_anchor(group)})" for group in GROUPS), ""]
    for group, description in GROUPS.items():
        parts += [f"## {group}\n", f"{description}\n", "| key | allowed | default | what it does |", "|---|---|---|---|"]
        parts += [_row(doc) for doc in docs if doc.group == group]
        parts.append("")
    return "\n".join(parts)


def _row(doc: FieldDoc) -> str:
    allowed = ", ".join(f"`{c}`" for c in doc.choices) if doc.choices else doc.allowed
    return f"| `{doc.name}` | {_cell(allowed)} | `{_yaml(doc.default)}` | {_cell(doc.help)} |"


def _yaml(value: Any) -> str:
    """A default as it is written in YAML: ``null``, ``[mlp]``, ``[0.25, 0.5]``, ``0.5``."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, spaces to dashes, punctuation dropped."""
    return "".join(c for c in heading.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(DOC.parents[1])}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the file differs from what the code generates")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        DOC.write_text(text, encoding="utf-8")
    elif args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date with SATConfig; regenerate it: {COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
