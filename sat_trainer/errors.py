"""The exceptions SAT raises: one message naming the key or module, the value, and what is allowed."""


class SATError(ValueError):
    """SAT cannot do what was asked (unsupported model, module or combination)."""


class SATConfigError(SATError):
    """A SAT setting is unknown, of the wrong type, or out of range."""


class SATTrainingError(SATError):
    """Training ran but failed (diverged): ``sat-train`` exits 1, not 2 (bad input)."""
