"""Patching models for SAT: the family registry, the per-block units, the model-level wiring."""
