"""The scoring subsample always holds each sequence's first real token, weighted as its own
stratum: pretrained LLMs put massive activations on a few MLP channels at that token only (the
attention sink), and a uniform subsample that misses it omits them."""

from __future__ import annotations

import pytest
import torch
from tiny import build, sat_config

from sat_trainer import apply_sat, importance


def test_sequence_starts_follow_padding_and_packing():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])  # the second row is all padding: it starts nowhere
    starts = importance.sequence_starts(2, 4, None, None, torch.device("cpu"))
    assert starts.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert importance.sequence_starts(2, 4, right.reshape(-1), None, torch.device("cpu")).tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert importance.sequence_starts(2, 4, left.reshape(-1), None, torch.device("cpu")).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])  # three documents in one row
    assert importance.sequence_starts(1, 6, None, packed, torch.device("cpu")).tolist() == [1, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("padded", [False, True])
def test_the_subsample_always_holds_every_start_and_no_padding(padded):
    total, batch = 4 * 32, 4
    mask = torch.ones(total)
    if padded:
        mask.view(batch, -1)[:, :5] = 0  # left padding: the first real token is at 5
    starts = importance.sequence_starts(batch, 32, mask if padded else None, None, torch.device("cpu"))
    for seed in range(50):
        rows = importance.sample_rows(
            total, 8, torch.Generator().manual_seed(seed), mask if padded else None, torch.device("cpu"), starts
        )
        assert set(starts.nonzero().squeeze(1).tolist()) <= set(rows.tolist())
        assert mask[rows].all()


@pytest.mark.parametrize("padded", [False, True])
def test_stratum_weights_give_every_real_tokens_mean_and_rms(padded):
    """Starts all equal v, the other real tokens all equal c, pads are huge: any draw's weighted
    mean and RMS are exactly those over every real token (a plain subsample's would not be)."""
    batch, length = 4, 32
    mask = torch.ones(batch * length)
    if padded:
        mask.view(batch, -1)[1, 20:] = 0
    starts = importance.sequence_starts(batch, length, mask, None, torch.device("cpu"))
    hidden = torch.full((batch * length, 3), 0.5)
    hidden[starts.bool()] = torch.tensor([40.0, -7.0, 3.0])
    hidden[~mask.bool()] = 1e4
    real = hidden[mask.bool()]
    for seed in range(5):
        rows, weights = importance.stratified_sample(
            batch * length, 12, torch.Generator().manual_seed(seed), mask, starts, torch.device("cpu")
        )
        sample = hidden.index_select(0, rows)
        assert float(weights.sum()) == pytest.approx(float(mask.sum()))
        torch.testing.assert_close(importance.real_token_mean(sample, weights), real.mean(0))
        torch.testing.assert_close(importance.channel_rms(sample, weights), real.square().mean(0).sqrt())


def _sink_model(channel: int):
    """A tiny Llama whose layer-0 MLP channel ``channel`` outputs exactly 0 except at tokens whose
    embedding points along feature 0, which it turns into a large output: the attention-sink
    pattern of pretrained LLMs when only the first token of each sequence points there."""
    model = build("llama", num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # the MLP sees the normalised embeddings
        model.model.layers[0].self_attn.o_proj.bias.zero_()
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[:, 0] = 0  # no other channel reads feature 0
            proj.weight[channel] = 0
            proj.weight[channel, 0] = 3.0
            proj.bias[channel] = 0
    return model.train()


def _sink_embeddings(seed: int, batch: int, length: int, first: torch.Tensor) -> torch.Tensor:
    embeds = torch.randn(batch, length, 64, generator=torch.Generator().manual_seed(seed))
    embeds[..., 0] = 0
    embeds[torch.arange(batch), first] = 0
    embeds[torch.arange(batch), first, 0] = 10.0
    return embeds


@pytest.mark.parametrize("scores", ["subsample", "training_forward"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_channel_massive_only_at_the_first_token_is_kept_at_every_draw(scores, padded):
    """8 of 128 tokens scored: a uniform subsample holds none of the 4 starts ~77% of the time and
    would then omit the channel (its output is 0 elsewhere) at rate 0.5."""
    channel, batch, length = 7, 4, 32
    model = _sink_model(channel)
    handle = apply_sat(
        model,
        sat_config(
            targets=["mlp"], activation_tokens=8, activation_token_fraction=0.01, activation_scores=scores, selection="topk"
        ),
    )
    handle.set_rate(0.5)
    first = torch.tensor([0, 3, 0, 6]) if padded else torch.zeros(batch, dtype=torch.long)
    mask = (torch.arange(length) >= first.unsqueeze(1)).long()  # left padding before each row's first token
    for step in range(12):
        handle.new_step()
        model(inputs_embeds=_sink_embeddings(step, batch, length, first), attention_mask=mask)
        assert channel in handle.kept()["model.layers.0.mlp"].tolist(), f"omitted at draw {step}"
