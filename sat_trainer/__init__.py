"""sat_trainer: Sparsity-Accelerated Training for Hugging Face causal LMs.

Public API: :class:`SATConfig`, :class:`SATCallback`, :func:`apply_sat`, :func:`remove_sat`
(and the :class:`SATHandle` that ``apply_sat`` returns, with ``set_rate``, ``new_step``, ``kept``).
"""

from .callback import SATCallback
from .config import SATConfig
from .errors import SATConfigError, SATError
from .patch.model import SATHandle, apply_sat, remove_sat

__all__ = ["SATCallback", "SATConfig", "SATConfigError", "SATError", "SATHandle", "apply_sat", "remove_sat"]
__version__ = "0.1.0"
