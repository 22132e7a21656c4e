"""sat_trainer: Sparsity-Accelerated Training for Hugging Face causal LMs.

Public API: :class:`SATConfig`, :class:`SATCallback`, :func:`apply_sat`, :func:`remove_sat`
(and the :class:`SATHandle` that ``apply_sat`` returns, with ``set_rate``, ``new_step``, ``kept``); LTE (Learn To
be Efficient, :mod:`sat_trainer.lte`): :class:`LTEConfig`, :class:`LTECallback`, :func:`apply_lte`, :func:`load_lte`.

Names are imported on first use (PEP 562), so that ``sat-train`` can reject a bad config in a
fraction of a second, before torch and transformers are imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LTECallback": ".lte.callback",
    "LTEConfig": ".lte.config",
    "LTEConfigError": ".lte.errors",
    "LTEError": ".lte.errors",
    "LTEHandle": ".lte.model",
    "SATCallback": ".callback",
    "SATConfig": ".config",
    "SATConfigError": ".errors",
    "SATError": ".errors",
    "SATHandle": ".patch.model",
    "apply_lte": ".lte.model",
    "apply_sat": ".patch.model",
    "load_lte": ".lte.model",
    "remove_sat": ".patch.model",
}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sat_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
