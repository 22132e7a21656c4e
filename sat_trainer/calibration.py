"""``layer_rates: auto``: per-block peak omission rates from a short calibration at train start.

A uniform rate treats every block alike, but blocks differ in what omitting their units costs
(in pretrained models typically the first layers and the last: the reason for ``dense_layers``). The
calibration measures, on a few training batches, each block's *cost* at each of a few rates
with only that block sparse, then gives each block a rate so that the total saving meets the
budget at the least summed cost (costs are taken as additive over blocks: a first-order model).

The cost follows what ``omit_in`` trains:

* ``forward_backward``: the relative increase of the loss (the sparse network's over the dense
  model's), one forward per block, rate and batch;
* ``backward`` and ``weight_gradient``: the forward is exact, so the cost is the gradient it
  cuts: the share of the squared norm of the full gradient that the block's omitted units'
  weights carry, with the units SAT would omit (the lowest scores, scored from what training
  scores them from). One dense backward per batch serves every block and rate. (Exact for
  ``weight_gradient``; for ``backward`` it ignores the input gradient the omitted units no
  longer pass to earlier layers.)

Budgets (``rate_budget``): ``flops`` saves as many matmul FLOPs as the uniform ``omission_rate``
would over the same blocks; ``loss`` saves the most FLOPs whose summed cost stays within
``loss_budget``. Allocation is greedy on the marginal cost per FLOP saved (exact for convex
cost curves). The peak rates then follow the schedule: a block with peak rate r_b runs at
``r_b * rate(t) / omission_rate`` at step t, so the ladder still ends dense.
"""

from __future__ import annotations

import functools
import logging
import statistics
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .ops import weight_numel
from .schedule import kept_count

if TYPE_CHECKING:
    from .patch.model import SATHandle

logger = logging.getLogger("sat_trainer")


def allocate(
    costs: list[list[float]], flops: list[float], rates: list[float], flop_budget: float | None, cost_budget: float | None
) -> list[float]:
    """Per-unit rate from ``[0] + rates`` (ascending) whose saving ``sum(rate_u * flops_u)`` reaches
    ``flop_budget`` (or, with ``cost_budget``, the most saving whose summed cost stays within it),
    raising one unit one level at a time where the added cost per added FLOP is least.

    ``costs[u][i]`` is unit u's cost at ``rates[i]``; a unit at rate 0 costs 0. Negative added
    costs (noise) count as 0.
    """
    options = [0.0, *rates]
    level = [0] * len(costs)
    total_cost = 0.0

    def cost(u: int, lvl: int) -> float:
        return 0.0 if lvl == 0 else costs[u][lvl - 1]

    while flop_budget is None or sum(options[lv] * f for lv, f in zip(level, flops)) < flop_budget - 1e-9:
        best, best_ratio = None, float("inf")
        for u, lvl in enumerate(level):
            if lvl == len(rates):
                continue
            added = cost(u, lvl + 1) - cost(u, lvl)
            if cost_budget is not None and total_cost + added > cost_budget:
                continue
            ratio = max(added, 0.0) / ((options[lvl + 1] - options[lvl]) * flops[u])
            if ratio < best_ratio:
                best, best_ratio = u, ratio
        if best is None:
            break
        total_cost += cost(best, level[best] + 1) - cost(best, level[best])
        level[best] += 1
    return [options[lv] for lv in level]


def calibrate(handle: SATHandle, model: torch.nn.Module, batches: list[dict]) -> dict:
    """Measure every unit's cost, assign per-unit peak rates (``unit.rate_scale``), return the table."""
    cfg = handle.config
    rates = list(cfg.calibration_rates)
    was_training, previous_rate = model.training, handle.rate
    model.train()
    try:
        if cfg.omit_in != "forward_backward":
            costs = _gradient_costs(handle, model, batches, rates)
        else:
            costs = _loss_costs(handle, model, batches, rates)
    finally:
        for unit in handle.units:
            unit.rate_scale = 1.0
        handle.rate = previous_rate
        handle.reset_draws()
        model.train(was_training)
    costs = _mean_over_ranks(handle, costs)
    flops = [float(sum(weight_numel(m) for m in u.members())) for u in handle.units]
    budget = cfg.omission_rate * sum(flops) if cfg.rate_budget == "flops" else None
    assigned = allocate(costs, flops, rates, budget, cfg.loss_budget if cfg.rate_budget == "loss" else None)
    for unit, rate in zip(handle.units, assigned):
        unit.rate_scale = rate / cfg.omission_rate
    table = {
        "cost": "relative loss increase" if cfg.omit_in == "forward_backward" else "share of the squared gradient norm cut",
        "rates": rates,
        "budget": cfg.rate_budget,
        "flops_saved_fraction_of_blocks": sum(r * f for r, f in zip(assigned, flops)) / sum(flops),
        "total_cost": sum(0.0 if r == 0 else c[rates.index(r)] for r, c in zip(assigned, costs)),
        "units": [
            {"name": u.name, "costs": [round(c, 6) for c in cs], "rate": r} for u, cs, r in zip(handle.units, costs, assigned)
        ],
    }
    logger.warning("sat_trainer: layer_rates auto\n%s", format_table(table))
    return table


def apply_table(handle: SATHandle, table: dict) -> None:
    """Put back the per-unit rates of a saved calibration (a resumed run does not calibrate again)."""
    by_name = {row["name"]: row["rate"] for row in table["units"]}
    for unit in handle.units:
        unit.rate_scale = by_name.get(unit.name, handle.config.omission_rate) / handle.config.omission_rate


def format_table(table: dict) -> str:
    head = "| block | " + " | ".join(f"cost at {r}" for r in table["rates"]) + " | peak rate |"
    lines = [
        f"cost: {table['cost']}; budget {table['budget']}; the blocks' FLOPs saved at peak: "
        f"{table['flops_saved_fraction_of_blocks']:.3f}; summed cost {table['total_cost']:.4f}",
        head,
        "|---|" + "---|" * (len(table["rates"]) + 1),
    ]
    for row in table["units"]:
        lines.append(f"| {row['name']} | " + " | ".join(f"{c:.4f}" for c in row["costs"]) + f" | {row['rate']} |")
    return "\n".join(lines)


def _loss_costs(handle: SATHandle, model: torch.nn.Module, batches: list[dict], rates: list[float]) -> list[list[float]]:
    """Relative loss increase with one unit at a time sparse, per rate, averaged over batches."""
    top = max(rates)
    handle.rate = top
    with torch.no_grad():
        for unit in handle.units:
            unit.rate_scale = 0.0
        dense = statistics.mean(model(**b).loss.item() for b in batches)
        costs = []
        for unit in handle.units:
            row = []
            for rate in rates:
                unit.rate_scale = rate / top
                losses = []
                for b in batches:
                    handle.new_step()
                    losses.append(model(**b).loss.item())
                row.append(statistics.mean(losses) / dense - 1.0)
            unit.rate_scale = 0.0
            costs.append(row)
    return costs


def _gradient_costs(handle: SATHandle, model: torch.nn.Module, batches: list[dict], rates: list[float]) -> list[list[float]]:
    """Per unit and rate: the share of the dense gradient's squared norm on the weights of the units
    SAT would omit (lowest scores), averaged over batches."""
    handle.rate = 0.0
    # each unit scores from what it scores from in training (BlockScorer.record_scored_input)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [u.scorer.record_scored_input(functools.partial(inputs.__setitem__, u.name)) for u in handle.units]
    per_batch = []
    try:
        for b in batches:
            model.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            total = sum(float(p.grad.float().square().sum()) for p in model.parameters() if p.grad is not None)
            rows = []
            for unit in handle.units:
                unit.reset_draws()  # every channel measured on this batch, as a first draw does (not a window)
                with torch.no_grad():
                    generator = torch.Generator(device=inputs[unit.name].device).manual_seed(0)
                    scores = unit.scorer.score_recorded(inputs[unit.name], generator)
                    share = unit.unit_gradient_square() / total
                rows.append([_omitted_share(scores, share, unit.groups, kept_count(unit.n // unit.groups, r)) for r in rates])
            per_batch.append(rows)
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [[statistics.mean(b[u][i] for b in per_batch) for i in range(len(rates))] for u in range(len(handle.units))]


def _omitted_share(scores: torch.Tensor, share: torch.Tensor, groups: int, kept_per_group: int) -> float:
    """Summed ``share`` of the units topk would omit: the lowest scores, the same count in each group."""
    scores, share = scores.reshape(groups, -1), share.reshape(groups, -1)
    lowest = scores.argsort(dim=1)[:, : scores.shape[1] - kept_per_group]
    return float(share.gather(1, lowest).sum())


def _mean_over_ranks(handle: SATHandle, costs: list[list[float]]) -> list[list[float]]:
    """Every rank must assign the same rates: average the measured costs over ranks."""
    device = handle.units[0].inputs[0].weight.device
    tensor = torch.tensor(costs, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()
