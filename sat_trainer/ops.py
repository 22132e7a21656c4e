"""Sliced linear ops: the one place where omitted neurons are skipped.

Every projection SAT touches is one of two roles:

* an *input* projection (gate/up, q/k/v, c_fc, fc1) computes only its kept **output** features:
  ``F.linear(x, W[idx], b[idx])``;
* the *output* projection (down, o, c_proj, fc2) reads only its kept **input** features:
  ``F.linear(h, W[:, idx], b)``.

The matmuls are smaller dense ones, never a mask over the full computation. Both ops take the
module itself, so one function serves ``nn.Linear`` (weight ``(out, in)``) and GPT-2's
``Conv1D`` (weight ``(in, out)``) through :func:`out_major_weight`. Autograd through
``index_select`` writes the kept rows/columns of a full-size, zero-filled weight gradient, so the
omitted neurons get exactly zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

SLICEABLE = (nn.Linear, Conv1D)


def is_sliceable(module: nn.Module) -> bool:
    """Plain dense projections only: subclasses (quantised, LoRA-wrapped, ...) are not assumed to slice."""
    return type(module) in SLICEABLE


def out_major_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an ``(out_features, in_features)`` view, whatever the layer's storage layout."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def out_features(module: nn.Module) -> int:
    return out_major_weight(module).shape[0]


def in_features(module: nn.Module) -> int:
    return out_major_weight(module).shape[1]


def linear_keep_outputs(module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``module(x)[..., idx]``, computed with only the kept rows of the weight."""
    bias = module.bias.index_select(0, idx) if module.bias is not None else None
    return F.linear(x, out_major_weight(module).index_select(0, idx), bias)


def linear_keep_inputs(module: nn.Module, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``module(h_full)`` where ``h`` holds only the kept input features ``idx`` (the rest are zero)."""
    return F.linear(h, out_major_weight(module).index_select(1, idx), module.bias)
