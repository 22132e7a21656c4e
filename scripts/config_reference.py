"""Generate docs/configuration.md (every `SATConfig` setting) and docs/lte_configuration.md (every `LTEConfig`
setting) from the dataclasses themselves.

Each field's help, group, allowed values and default come from the annotations and field metadata
(``sat_trainer/config.py``, ``sat_trainer/lte/config.py``), so the references cannot drift from the code:
``tests/test_config_reference.py`` fails when a file differs from ``render()`` / ``render_lte()``.

    python scripts/config_reference.py            # print the SAT reference
    python scripts/config_reference.py --write    # rewrite both files
    python scripts/config_reference.py --check    # exit 1 if either file is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sat_trainer.config import GROUPS, FieldDoc, field_docs
from sat_trainer.lte import config as lte_config
from sat_trainer.settings import field_docs as settings_field_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
LTE_DOC = DOC.with_name("lte_configuration.md")
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


LTE_INTRO = f"""# LTE settings

<!-- Generated from sat_trainer/lte/config.py by `{COMMAND}`: edit the field metadata there, not this file. -->

Every setting of LTE (Learn To be Efficient; [the guide](guide/lte.md)) is a field of `sat_trainer.LTEConfig`. All
are optional. A wrong key, or a value of the wrong type or out of its range, raises one `LTEConfigError` naming the
key, the value and what is allowed. `LTECallback` and `apply_lte` take an `LTEConfig`, a dict of its keys, a YAML
path (settings at the top level or under `lte:`), or `None` (all defaults). In a `sat-train` scenario the same keys
are its `lte:` section ([In sat-train](guide/lte.md#in-sat-train)), checked before anything loads.
"""


def render() -> str:
    """The whole of docs/configuration.md: how to set the fields, then one table per group of `GROUPS`."""
    return _render(INTRO, GROUPS, field_docs())


def render_lte() -> str:
    """The whole of docs/lte_configuration.md, laid out as the SAT reference."""
    return _render(LTE_INTRO, lte_config.GROUPS, settings_field_docs(lte_config.LTEConfig))


def _render(intro: str, groups: dict[str, str], docs: list[FieldDoc]) -> str:
    parts = [intro, "## Groups\n", *(f"- [{group}](#{_anchor(group)})" for group in groups), ""]
    for group, description in groups.items():
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
    mode.add_argument("--write", action="store_true", help="rewrite docs/configuration.md and docs/lte_configuration.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file differs from what the code generates")
    args = p.parse_args(argv)
    files = {DOC: (render(), "SATConfig"), LTE_DOC: (render_lte(), "LTEConfig")}
    if args.write:
        for path, (text, _) in files.items():
            path.write_text(text, encoding="utf-8")
    elif args.check:
        stale = [
            (path, cls) for path, (text, cls) in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text
        ]
        for path, cls in stale:
            print(f"{path} is out of date with {cls}; regenerate it: {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    else:
        sys.stdout.write(files[DOC][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
