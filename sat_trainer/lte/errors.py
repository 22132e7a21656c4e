"""The exceptions LTE raises: one message naming the key or module, the value, and what is allowed."""

from __future__ import annotations

from ..errors import SATConfigError, SATError


class LTEError(SATError):
    """LTE cannot do what was asked (unsupported model or block, bad saved files, a model patched twice)."""


class LTEConfigError(LTEError, SATConfigError):
    """An LTE setting is unknown, of the wrong type, or out of range."""
