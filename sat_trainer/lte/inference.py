"""Sparse inference of a routed MLP: only the selected experts' gate/up rows and down columns are computed.

The hard stage's reference forward (:meth:`~sat_trainer.lte.router.RoutedMLP.forward` in training) computes every
neuron and multiplies the unselected ones by zero, so it is exact but no faster than dense. In eval mode with
autograd off (what ``model.generate`` runs under), on the CPU, a routed MLP whose projections are plain
``nn.Linear`` instead runs :meth:`ExpertLayout.forward`:

1. the router's selection ``sigmoid(x W_g + b) > threshold`` per token (computed by the caller);
2. the *union* of the experts selected by any token of the call (one token when decoding at batch 1) is read off
   with ``nonzero``, a host sync; on the CPU that sync is free;
3. the union's experts are gathered from a buffer that holds each expert's gate and up rows contiguously,
   ``(experts, 2 * size, hidden)``: one ``index_select`` of whole expert blocks and one matmul;
4. ``act(gate) * up`` is multiplied by each token's own selection (only when the call has several tokens:
   a token's union may hold experts it did not select), and one matmul with the union's rows of the transposed
   down projection, ``(neurons, hidden)`` stored expert by expert, gives the output.

When every expert is in the union (typically a long prefill) there is nothing to skip and :meth:`forward` returns
None: the caller runs the masked dense reference, which is then also the cheapest exact computation. With every
expert selected for every token that reference multiplies by ones, so the output is the dense model's, bit for
bit. Otherwise the gathered path equals the masked reference up to float summation order.

Kernel choice (indicative in-process micro-benchmarks on a shared 2-core CPU, SmolLM2-135M's MLP shape, one
token, 30 layers): gathering whole expert blocks and one matmul ran as fast as a dense MLP of the selected width;
``embedding_bag`` with per-token weights for the down projection (reads the selected rows without a copy) was
equal within noise, and a loop over contiguous runs of selected experts was clearly slower (one call per run).

**Memory vs simplicity.** The layout is kept in separate buffers, a copy of the routed MLPs' weights (for
SmolLM2-135M in float32 about 0.3 GB beside the 0.5 GB model), rather than permuting the module weights in place.
In place would cost no memory but would have to be undone before every save and on ``remove()``, would misalign
an optimizer's state and PEFT adapters if training continued, and still could not give the transposed down
projection the decode kernel wants. With buffers the model's own weights, its state dict, the saved files and the
training-mode hard path never see another layout. The buffers are built at the first eval forward in stage hard
(or eagerly by :func:`~sat_trainer.lte.model.load_lte`), rebuilt when a source weight changes (in-place version
counter or storage: an optimizer step, ``load_state_dict``, ``.to``), and dropped when the MLP trains, in stage
soft, and on ``remove()``.

**GPU plan (not built).** On an accelerator the ``nonzero`` of step 2 is a host sync per layer, which would stall
decoding; there the hard stage runs the masked dense reference today (exact, no speed-up). The paper's path is a
gather-GEMV kernel (e.g. Triton) over the same expert-contiguous buffers that reads the selection mask on the
device: one program per (expert, output tile) skips its expert when the token did not select it, computes the
gate/up dot products of the selected rows, and a second kernel accumulates ``h_j * down_t[j]`` over the selected
rows only (split over hidden tiles, so no atomics at batch 1). No index list leaves the device, and the work
read scales with the selected fraction. Larger batches would group tokens by expert (a grouped GEMM, as MoE
kernels do) or fall back to the masked dense path when the union is nearly everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..patch.registry import BlockShape


def plain_projections(block: nn.Module, shape: BlockShape) -> list[nn.Linear] | None:
    """The MLP's input projections then its output projection, when all are plain ``nn.Linear`` (not PEFT-wrapped,
    not quantised); else None (the fast path then stays off: merge LoRA adapters into the weights first)."""
    modules = [getattr(block, name) for name in (*shape.inputs, shape.output)]
    if all(isinstance(m, nn.Linear) and not hasattr(m, "get_base_layer") and m.weight.is_floating_point() for m in modules):
        return modules
    return None


def _source_key(tensors: list[torch.Tensor | None]) -> tuple:
    """What changes when a tensor is edited or replaced: its storage, in-place version, dtype and device."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class ExpertLayout:
    """One routed MLP's weights in expert-contiguous buffers, and the gathered forward over selected experts.

    Args:
        block: the gated MLP.
        shape: its registry shape (``inputs`` gate and up, or one fused ``gate_up``; ``output`` down).
        projections: :func:`plain_projections` of ``block``.
        expert_of: (n,) the expert of each neuron.
        size: neurons per expert.
    """

    def __init__(self, block: nn.Module, shape: BlockShape, projections: list[nn.Linear], expert_of: torch.Tensor, size: int):
        *inputs, down = projections
        self.activation = getattr(block, shape.activation)
        self.size = size
        self.experts = expert_of.numel() // size
        self.projections = projections
        self.key = self.source_key(projections, expert_of)
        order = torch.argsort(expert_of, stable=True).to(down.weight.device)  # neuron ids, expert by expert
        with torch.no_grad():
            if shape.fused:
                gate_w, up_w = inputs[0].weight.chunk(2, dim=0)
                gate_b, up_b = inputs[0].bias.chunk(2) if inputs[0].bias is not None else (None, None)
            else:
                (gate_w, gate_b), (up_w, up_b) = ((m.weight, m.bias) for m in inputs)
            hidden = gate_w.shape[1]
            blocks = [w.index_select(0, order).view(self.experts, size, hidden) for w in (gate_w, up_w)]
            self.gate_up = torch.cat(blocks, dim=1).contiguous()  # (experts, 2 * size, hidden): gate rows, then up rows
            self.gate_up_bias = None
            if gate_b is not None or up_b is not None:
                biases = [
                    (b if b is not None else torch.zeros_like(gate_w[:, 0])).index_select(0, order).view(self.experts, size)
                    for b in (gate_b, up_b)
                ]
                self.gate_up_bias = torch.cat(biases, dim=1).contiguous()  # (experts, 2 * size)
            self.down_t = down.weight.index_select(1, order).t().contiguous().view(self.experts, size, -1)
            self.down_bias = None if down.bias is None else down.bias.detach().clone()

    @staticmethod
    def source_key(projections: list[nn.Linear], expert_of: torch.Tensor) -> tuple:
        """The identity of what the buffers were built from; a layout whose :attr:`key` differs is stale."""
        tensors = [t for m in projections for t in (m.weight, m.bias)]
        return _source_key([*tensors, expert_of])

    def is_current(self, block: nn.Module, shape: BlockShape, expert_of: torch.Tensor) -> bool:
        """Whether ``block`` still has the projections these buffers were built from, unchanged (the per-call check
        of the fast path: cheaper than :func:`plain_projections`)."""
        names = (*shape.inputs, shape.output)
        return all(getattr(block, n) is m for n, m in zip(names, self.projections)) and self.key == self.source_key(
            self.projections, expert_of
        )

    def forward(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor | None:
        """The MLP's output computing only the experts some token selected, or None when every expert is selected
        by some token (the caller then runs the masked dense reference).

        Args:
            x: (..., hidden) the MLP's input.
            selected: (..., experts) bool, each token's selection.

        Returns:
            (..., hidden) the output, equal to the masked dense reference up to summation order; or None.
        """
        hidden = x.shape[-1]
        tokens = x.reshape(-1, hidden)
        chosen = selected.reshape(-1, self.experts)
        union = chosen[0] if chosen.shape[0] == 1 else chosen.any(dim=0)
        experts = union.nonzero().squeeze(1)  # host sync: free on the CPU (the only device this runs on)
        k = experts.numel()
        if k == self.experts:
            return None
        if k == 0:
            out = tokens.new_zeros(tokens.shape[0], self.down_t.shape[-1])
            if self.down_bias is not None:
                out += self.down_bias
        else:
            size = self.size
            weight = self.gate_up.index_select(0, experts).view(k * 2 * size, hidden)
            bias = None if self.gate_up_bias is None else self.gate_up_bias.index_select(0, experts).view(-1)
            gate_up = F.linear(tokens, weight, bias).view(-1, k, 2 * size)
            h = self.activation(gate_up[..., :size]) * gate_up[..., size:]  # (tokens, k, size)
            if tokens.shape[0] > 1:  # a token runs only the experts it selected itself
                h = h * chosen.index_select(1, experts).unsqueeze(-1).to(h.dtype)
            down_t = self.down_t.index_select(0, experts).view(k * size, -1)
            out = h.reshape(-1, k * size) @ down_t
            if self.down_bias is not None:
                out += self.down_bias
        return out.view(*x.shape[:-1], -1)
