"""`Settings`: what the package's setting dataclasses (`SATConfig`, `LTEConfig`) share, written once.

A settings class is a dataclass whose fields describe themselves in their ``metadata``: ``help`` (what it does,
what is allowed), ``group`` and, where the annotation alone does not say what is allowed, a ``range`` (a
:class:`~sat_trainer.value_range.Range`) or an ``allowed`` text with a ``check`` function. From the annotations
(``Literal`` for choices, ``list[Literal]`` for subsets, ``int``/``float``, ``X | None``) and that metadata this
module derives the type and range checks, the words of every error (key, value, what is allowed) and the rows of
a generated reference, so the three cannot drift apart. Checks run in ``__post_init__``, before any model is touched.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn, get_args, get_origin

from .errors import SATConfigError
from .yaml_io import load_yaml_file


class Settings:
    """Base of a settings dataclass: validation from field metadata, ``from_dict``/``from_yaml``/``to_dict``.

    A subclass sets ``KIND`` (the word in messages: ``"SAT"``), ``SECTION`` (its YAML block: ``"sat"``),
    ``ERROR`` (the exception it raises) and ``EXAMPLE`` (a mapping shown when a config of the wrong type is given).
    """

    KIND = "settings"
    SECTION = "settings"
    ERROR: type[SATConfigError] = SATConfigError
    EXAMPLE = "{}"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(type(self), f, getattr(self, f.name)))

    @classmethod
    def fail(cls, key: str, value: Any, allowed: str) -> NoReturn:
        """Raise the one error for ``key``: its value and what is allowed."""
        raise cls.ERROR(f"{cls.KIND} config key {key!r} has invalid value {value!r}; allowed: {allowed}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a mapping, rejecting unknown keys by name."""
        if not isinstance(data, Mapping):
            raise cls.ERROR(f"{cls.KIND} config must be a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise cls.ERROR(
                f"unknown {cls.KIND} config key {unknown[0]!r} (value {data[unknown[0]]!r}); "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path):
        """Load from a YAML (or JSON) file whose settings are at top level or under the ``SECTION`` key."""
        data = load_yaml_file(path) or {}
        if isinstance(data, dict) and cls.SECTION in data:
            data = data[cls.SECTION] or {}
        try:
            return cls.from_dict(data)
        except cls.ERROR as err:
            raise cls.ERROR(f"{path}: {err}") from None

    @classmethod
    def coerce(cls, config: Any):
        """What a callback or ``apply_*`` accepts: an instance, a mapping of its keys, a YAML path, or None
        (the defaults); anything else raises one line saying so."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(dict(config))
        if isinstance(config, (str, Path)):
            return cls.from_yaml(config)
        article = "an" if cls.__name__[0] in "AEFHILMNORX" else "a"
        raise cls.ERROR(
            f"{cls.KIND} config must be {article} {cls.__name__}, a mapping of its keys (e.g. {cls.EXAMPLE}), a YAML path "
            f"or None; got {type(config).__name__} {config!r:.60}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (lists copied), as ``from_dict`` takes it back."""
        return dataclasses.asdict(self)


class FieldDoc(NamedTuple):
    """One row of a reference: a field's key, group, allowed values (``choices`` for an enum), default and help."""

    name: str
    group: str
    allowed: str
    choices: tuple[str, ...] | None
    default: Any
    help: str


def field_docs(cls: type[Settings]) -> list[FieldDoc]:
    """Every field of ``cls`` in declaration order, as a generated reference lists it."""
    defaults = cls().to_dict()
    return [
        FieldDoc(
            f.name, f.metadata["group"], _allowed(cls, f), _choices(_hints(cls)[f.name]), defaults[f.name], f.metadata["help"]
        )
        for f in dataclasses.fields(cls)
    ]


def field_help(cls: type[Settings]) -> dict[str, str]:
    """Help text per key, for docs and listings."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def layer_indices(value: Any) -> list[int]:
    """A ``check`` for a list of decoder-layer indices (negative counts from the last layer)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError
    return list(value)


LAYER_INDICES = "a list of layer indices (integers; negative counts from the last layer)"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The fields' annotations, resolved (``from __future__ import annotations`` leaves them strings)."""
    return typing.get_type_hints(cls)


def _choices(hint: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` annotation, else None."""
    return get_args(hint) if get_origin(hint) is Literal else None


def _nullable(hint: Any) -> bool:
    return type(None) in get_args(hint)


def _allowed(cls: type[Settings], f: dataclasses.Field) -> str:
    """What ``f`` allows, in the words its error message and the reference use."""
    hint, spec = _hints(cls)[f.name], f.metadata
    if "allowed" in spec:
        return ("null, or " if _nullable(hint) else "") + spec["allowed"]
    if _choices(hint):
        return ", ".join(_choices(hint))
    if get_origin(hint) is list and _choices(get_args(hint)[0]):
        return f"a non-empty list without repeats drawn from {list(_choices(get_args(hint)[0]))}"
    if "range" in spec:
        return spec["range"].describe()
    return {int: "an integer", float: "a number", bool: "true or false"}[hint]


def _checked(cls: type[Settings], f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field keeps it, checked against the field's annotation and metadata."""
    hint, spec = _hints(cls)[f.name], f.metadata
    if value is None and _nullable(hint):
        return None
    if "check" in spec:
        try:
            return spec["check"](value)
        except (TypeError, ValueError):
            cls.fail(f.name, value, _allowed(cls, f))
    if _choices(hint):
        if isinstance(value, str) and value in _choices(hint):
            return value
        cls.fail(f.name, value, _allowed(cls, f))
    if get_origin(hint) is list:  # a list of Literal values (targets); one name alone is a list of one
        items, choices = [value] if isinstance(value, str) else value, _choices(get_args(hint)[0])
        if not isinstance(items, (list, tuple)) or not items or any(i not in choices for i in items):
            cls.fail(f.name, value, _allowed(cls, f))
        if len(set(items)) != len(items):
            cls.fail(f.name, value, _allowed(cls, f))
        return list(items)
    if hint is bool:
        if not isinstance(value, bool):
            cls.fail(f.name, value, _allowed(cls, f))
        return value
    types = (int,) if hint is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, types):
        cls.fail(f.name, value, f"a value of type {' or '.join(t.__name__ for t in types)}")
    if "range" in spec and not spec["range"].allows(value):
        cls.fail(f.name, value, spec["range"].describe())
    return value
