"""What every patched block of one model reads while it runs: rate, draw number, and the current forward's tokens.

The :class:`~sat_trainer.patch.model.SATHandle` owns one :class:`ForwardContext` and passes it to
its blocks; the handle writes the rate and the draw number, the model's forward pre-hook writes
the forward's padding mask, positions and loss-token split (:meth:`ForwardContext.read_model_inputs`),
and the blocks read them and note the sequence length. No block holds its handle.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import importance
from ..config import SATConfig

DATA_DEPENDENT_METRICS = ("wanda", "maxip", "activation")  # scores read the rank's own tokens: averaged over ranks


class ForwardContext:
    """The state shared by one model's patched blocks.

    ``rate``: the omission rate (with ``axis_rates``, the largest of them); ``axis_rates``: None, or each target's
    own rate (``mlp``, ``attention``, ``layers``: schedule est), read through :meth:`rate_for`; ``draw_id``: the draw number (every block draws its kept set at most
    once per number); ``seq_len``: the latest forward's sequence length (for the FLOP count);
    ``token_mask``: 1 on real tokens, 0 on padding (flattened), so scoring ignores pads;
    ``position_ids``: where packed sequences restart at 0; ``token_split``: under
    ``sparse_tokens: context``, (dense rows, sparse rows) of the forward's flattened tokens; ``rows``:
    while a split MLP block runs one of them, that row set.
    """

    def __init__(self, config: SATConfig):
        self.config = config
        self.rate = 0.0
        self.axis_rates: dict[str, float] | None = None
        self.draw_id = 0
        self.seq_len = 1
        self.token_mask: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self.token_split: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows: torch.Tensor | None = None  # the token rows an MLP block's forward runs on now, within the split
        self._starts: tuple[tuple[int, ...], torch.Tensor] | None = None

    def rate_for(self, target: str) -> float:
        """The omission rate of ``target``'s units (``mlp``, ``attention`` or ``layers``): its own, or the one rate."""
        return self.rate if self.axis_rates is None else self.axis_rates.get(target, 0.0)

    def read_model_inputs(self, kwargs: dict, training: bool) -> None:
        """Keep the model forward's 2-D ``attention_mask`` (flattened) so data-dependent scores skip padding,
        its 2-D ``position_ids``, and under ``sparse_tokens: context`` the split of its ``labels``' tokens.
        A forward without a mask scores every token."""
        mask = kwargs.get("attention_mask")
        self.token_mask = mask.reshape(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        positions = kwargs.get("position_ids")
        self.position_ids = positions if isinstance(positions, torch.Tensor) and positions.dim() == 2 else None
        self._starts = None
        if self.config.sparse_tokens == "context":
            self.token_split = loss_token_split(kwargs.get("labels"), training)

    def note_sequence_length(self, x: torch.Tensor) -> None:
        """A block's input ``x`` (``(..., tokens, features)``) sets the sequence length the FLOP count uses."""
        self.seq_len = x.shape[-2] if x.dim() > 1 else 1

    def token_mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The padding mask of the tokens in ``x`` (``(..., tokens, features)``), if it matches them (or the
        row set of the split that runs now)."""
        mask = self.token_mask
        if mask is not None and self.rows is not None and self.rows.numel() == x.numel() // x.shape[-1]:
            mask = mask.index_select(0, self.rows)
        if mask is None or mask.numel() != x.numel() // x.shape[-1] or mask.device != x.device:
            return None
        return mask.to(x.dtype)

    def sequence_starts_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """1 at each sequence's first real token among ``x``'s (``batch x length x features``)
        flattened tokens, else 0 (:func:`importance.sequence_starts`); None for other shapes. Built
        once per forward and shape: every block of the forward reuses it."""
        if x.dim() != 3:
            return None
        shape = (*x.shape[:2], x.device.type, x.device.index)
        if self._starts is None or self._starts[0] != shape:
            mask = self.token_mask_for(x)
            starts = importance.sequence_starts(x.shape[0], x.shape[1], mask, self.position_ids, x.device)
            self._starts = (shape, starts)
        return self._starts[1]

    def token_split_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(dense rows, sparse rows) of ``x``'s flattened tokens under ``sparse_tokens: context``, if they match."""
        split = self.token_split
        if split is None or split[0].numel() + split[1].numel() != x.numel() // x.shape[-1] or split[0].device != x.device:
            return None
        return split

    def sync_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Average data-dependent scores over ranks (in place) so every rank keeps the same set."""
        data_dependent = self.config.metric in DATA_DEPENDENT_METRICS
        if data_dependent and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(scores, op=dist.ReduceOp.SUM)
            scores /= dist.get_world_size()
        return scores


def loss_token_split(labels: object, training: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flattened token rows that carry the loss (their label, or the next token's, which they predict, is
    not -100) and the others. Finding them is the one host sync of the split, once per forward."""
    if not training or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return None
    dense = labels != -100
    dense[:, :-1] |= labels[:, 1:] != -100
    dense = dense.reshape(-1)
    return dense.nonzero().squeeze(1), (~dense).nonzero().squeeze(1)
