"""`Range`: an interval of allowed integers or numbers, with the words that say it in an error.

The engine's ``SATConfig`` puts one in a field's metadata and the ``sat-train`` application
(``app/ranges.py``) one per numeric field of ``TrainingArguments`` and ``LoraConfig``, so both
refuse a value with the same wording: ``an integer >= 1``, ``a number in [0, 1)``. NaN and
infinities are never allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import SATConfigError


@dataclass(frozen=True)
class Range:
    """An interval of integers or numbers; ``also``: values allowed outside it (``-1`` = unset)."""

    low: float | None = None
    high: float | None = None
    integer: bool = True
    low_open: bool = False
    high_open: bool = False
    also: tuple[int, ...] = ()
    nullable: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """What is allowed, in words: ``an integer >= 1``, ``a number in [0, 1)``, ``-1 or an integer >= 1``."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            bounds = "(finite)"
        extra = [*map(str, self.also), *(["null"] if self.nullable else [])]
        return f"{' or '.join(extra)} or {kind} {bounds}" if extra else f"{kind} {bounds}"

    def check(self, key: str, value: Any) -> Any:
        """``value`` if allowed; else :class:`SATConfigError` naming ``key``, the value and the range."""
        if not self.allows(value):
            raise SATConfigError(f"key {key!r} has invalid value {value!r}; allowed: {self.describe()}")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def ints(low: int | None = None, high: int | None = None, **kwargs: Any) -> Range:
    """Integers in [low, high] (either end may be left open or out); ``kwargs``: the other `Range` fields."""
    return Range(low, high, integer=True, **kwargs)


def numbers(low: float | None = None, high: float | None = None, **kwargs: Any) -> Range:
    """Finite numbers (integers too) in [low, high]; ``kwargs``: the other `Range` fields."""
    return Range(low, high, integer=False, **kwargs)
