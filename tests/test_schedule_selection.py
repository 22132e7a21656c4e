"""Schedules, kept counts, selection and the importance metrics."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import batch, build, sat_config

from sat_trainer import apply_sat, importance, selection
from sat_trainer.schedule import kept_count, ladder_rungs, omission_rate_at


def test_ladder_default_shape_ends_dense():
    cfg = sat_config(omission_rate=0.6, ladder_sparse_fraction=0.5, ladder_num_rungs=2)
    rates = [omission_rate_at(cfg, s, 100) for s in range(100)]
    assert rates[:50] == [0.6] * 50
    assert rates[50:75] == [pytest.approx(0.3)] * 25
    assert rates[75:] == [0.0] * 25


def test_explicit_rungs():
    cfg = sat_config(ladder_rungs=[[0.0, 0.7], [0.4, 0.5], [0.9, 0.0]])
    assert ladder_rungs(cfg) == [(0.0, 0.7), (0.4, 0.5), (0.9, 0.0)]
    assert [omission_rate_at(cfg, s, 10) for s in (0, 3, 4, 8, 9)] == [0.7, 0.7, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("schedule,at_half", [("constant", 0.4), ("linear", 0.2), ("cosine", 0.2)])
def test_smooth_schedules(schedule, at_half):
    cfg = sat_config(omission_rate=0.4, schedule=schedule)
    assert omission_rate_at(cfg, 0, 11) == pytest.approx(0.4)
    assert omission_rate_at(cfg, 5, 11) == pytest.approx(at_half)
    if schedule != "constant":
        assert omission_rate_at(cfg, 10, 11) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 33])
def test_last_step_is_dense_however_few_steps(steps):
    for schedule in ("ladder", "linear", "cosine"):
        assert omission_rate_at(sat_config(schedule=schedule), steps - 1, steps) == pytest.approx(0.0, abs=1e-12)


def test_kept_count_rounds_half_up_and_keeps_one():
    assert kept_count(10, 0.5) == 5
    assert kept_count(5, 0.5) == 3  # 2.5 rounds up
    assert kept_count(4, 0.99) == 1
    assert kept_count(7, 0.0) == 7


@pytest.mark.slow
def test_sampling_trains_every_channel_within_50_steps():
    model = build("llama")
    handle = apply_sat(model, sat_config(omission_rate=0.5, metric="wanda", selection="sampling", targets=["mlp"]))
    model.train()
    handle.set_rate(0.5)
    seen = {}
    for step in range(50):
        handle.new_step()
        model(batch(seed=step))
        for name, kept in handle.kept().items():
            seen.setdefault(name, set()).update(kept.tolist())
    assert all(len(s) == 96 for s in seen.values()), {n: 96 - len(s) for n, s in seen.items()}


def test_topk_with_fixed_input_keeps_the_same_set():
    model = build("llama")
    handle = apply_sat(model, sat_config(omission_rate=0.5, metric="wanda", selection="topk"))
    model.train()
    handle.set_rate(0.5)
    sets = []
    for _ in range(3):
        handle.new_step()
        with torch.no_grad():
            model(batch(seed=3))
        sets.append({n: k.tolist() for n, k in handle.kept().items()})
    assert sets[0] == sets[1] == sets[2]


def test_uniform_metric_draws_random_subsets_reproducibly():
    def kept_sets(seed):
        model = build("llama")
        handle = apply_sat(model, sat_config(omission_rate=0.5, metric="uniform", selection="topk", seed=seed))
        model.train()
        handle.set_rate(0.5)
        out = []
        for _ in range(2):
            handle.new_step()
            with torch.no_grad():
                model(batch())
            out.append(handle.kept()["model.layers.0.mlp"].tolist())
        return out

    first, again, other = kept_sets(0), kept_sets(0), kept_sets(1)
    assert first == again
    assert first[0] != first[1] and first != other


def test_sampling_follows_scores():
    scores = torch.tensor([100.0] * 4 + [1e-6] * 4)
    picks = [selection.sampling(scores, 4, 1.0, selection.generator_for(0, d, 0)).tolist() for d in range(20)]
    assert all(p == [0, 1, 2, 3] for p in picks)
    hot = torch.tensor([2.0] * 4 + [1.0] * 4)
    tempered = [selection.sampling(hot, 4, 100.0, selection.generator_for(0, d, 0)) for d in range(200)]
    share_low = sum(int((t >= 4).sum()) for t in tempered) / (200 * 4)
    assert 0.4 < share_low < 0.6  # high temperature: close to uniform


def test_metric_definitions_on_known_weights():
    w_in = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # 4 channels
    w_out = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # (out, in=4)
    torch.testing.assert_close(importance.magnitude([w_in], w_out, 4), torch.tensor([5.0, 1.0, 2.0, 1.0]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # column norms 1, 2
    torch.testing.assert_close(importance.wanda(x, [w_in], 4), torch.tensor([11.0, 1.0, 4.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(importance.maxip(x, w_in, 4, 8, gen), torch.tensor([8.0, 1.0, 4.0, 0.0]))
    # two units of two features each: scores aggregate over the unit's chunk
    torch.testing.assert_close(importance.magnitude([w_in], w_out, 2), torch.tensor([math.sqrt(26.0), math.sqrt(5.0)]))
