"""YAML for scenario files and ``--set`` values: one-line errors, and ``1e-4`` read as a number.

PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``): ``learning_rate: 1e-4`` would
arrive as the *string* "1e-4" and fail deep inside training. Our loader adds the YAML 1.2 float
form. Syntax errors name the file, line and column (PyYAML's own say ``<unicode string>``), and
a file that is not UTF-8 is named with the byte offset and line of the first bad byte.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import SATConfigError

_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` and ``5E3`` as floats (YAML 1.2), as every user expects."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml_file(path: str | Path) -> Any:
    """The parsed content of a YAML file; raises :class:`SATConfigError` naming the file and where."""
    path = Path(path)
    if not path.is_file():
        raise SATConfigError(f"config file not found: {path}")
    return _parse(read_utf8(path), str(path))


def parse_value(text: str, where: str) -> Any:
    """A ``--set`` value parsed as YAML (so ``0.3``, ``true``, ``[a, b]`` and ``1e-4`` work)."""
    return _parse(text, where)


def read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 raises one line naming the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SATConfigError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); save the file as UTF-8"
        ) from None


def _parse(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        hint = "indent with spaces, not tabs" if "\\t" in (err.problem or "") else "fix the YAML syntax there"
        raise SATConfigError(f"{place}: YAML syntax error: {err.problem or err.context}; {hint}") from None
    except yaml.YAMLError as err:
        raise SATConfigError(f"{where}: YAML error: {str(err).splitlines()[0]}") from None
