"""Check a YAML section against the field types of the dataclass it will build, before building it.

``transformers.TrainingArguments`` and ``peft.LoraConfig`` accept ``learning_rate="1e-4"`` or
``r="8"`` without complaint and fail much later (a ``TypeError`` deep in the scheduler after the
model and data loaded). Here a numeric string is coerced to the field's number type, and any
other value of the wrong type, or an enum value that does not exist, is one line naming the key,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from ..errors import SATConfigError


def check_fields(raw: dict[str, Any], cls: type, section: str) -> dict[str, Any]:
    """``raw`` with numeric strings coerced; raises for unknown keys and mistyped values."""
    hints = _hints(cls)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            raise SATConfigError(f"unknown key '{section}.{key}': not a {cls.__module__.split('.')[0]}.{cls.__name__} field")
        out[key] = _check(f"{section}.{key}", value, hints[key])
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw field types
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _check(key: str, value: Any, hint: Any) -> Any:
    options = _options(hint)
    if value is None and type(None) in options:
        return None
    enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
    if enums and isinstance(value, str):
        allowed = [e.value for e in enums[0]]
        if value not in allowed:
            raise SATConfigError(f"key {key!r} has invalid value {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    scalars = [o for o in options if o in (bool, int, float)]
    if not scalars or len(scalars) != len([o for o in options if o is not type(None)]):
        return value  # strings, mappings, lists, objects: the class itself checks them
    if bool in scalars:
        if isinstance(value, bool):
            return value
        raise SATConfigError(f"key {key!r} has invalid value {value!r}; allowed: true or false")
    if isinstance(value, str):
        value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and float not in scalars):
        allowed = "an integer" if float not in scalars else "a number"
        raise SATConfigError(
            f"key {key!r} has invalid value {value!r}; allowed: {allowed}" + (" or null" if type(None) in options else "")
        )
    return value


def _options(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a ``Union``/``Optional``/``X | Y`` hint, or the hint alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _number(text: str) -> int | float | str:
    """``"8"`` -> 8, ``"1e-4"`` -> 0.0001; anything else is returned unchanged (and then rejected)."""
    for convert in (int, float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return text
