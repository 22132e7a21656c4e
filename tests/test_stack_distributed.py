"""DDP (2 CPU processes, gloo): every rank keeps the same sets every step, also with a
data-dependent metric, and the result matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # minutes on a CPU: pytest -m "not slow" leaves it out

WORKER = Path(__file__).parent / "ddp_worker.py"
STEPS = 6


def _launch(args: list[str], processes: int, env: dict) -> None:
    """Run a worker in `processes` ranks; on failure show its stderr (the traceback of the rank that died)."""
    if processes > 1:  # --standalone: torchrun picks a free rendezvous port itself, no race with other tests
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    proc = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env},
        timeout=180,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"worker exited with {proc.returncode}:\n{proc.stderr[-6000:]}")


def _run(out: Path, metric: str, batch: int, processes: int, omit_in: str = "forward_backward", tokens: str = "all") -> None:
    out.mkdir(parents=True, exist_ok=True)
    _launch([str(WORKER), str(out), metric, str(batch), str(STEPS), omit_in, tokens], processes, {"MASTER_ADDR": "127.0.0.1"})


def _kept(out: Path, rank: int) -> dict:
    data = json.loads((out / f"kept_rank{rank}.json").read_text())
    return data


@pytest.mark.parametrize(
    "metric,omit_in",
    [
        ("wanda", "forward_backward"),
        ("activation", "forward_backward"),
        ("magnitude", "forward_backward"),
        ("activation", "backward"),
    ],
)
def test_ddp_ranks_agree_and_match_one_process(tmp_path, metric, omit_in):
    """Every rank draws the same sets from the same scores. With a data-dependent metric each rank measures
    its own half of the batch (omit_in backward: inside the forward, from down's input and v's output), so
    the scores are the same only because they are averaged over ranks."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run(ddp, metric, batch=2, processes=2, omit_in=omit_in)
    r0, r1 = _kept(ddp, 0), _kept(ddp, 1)
    assert r0["world"] == r1["world"] == 2
    assert len(r0["kept"]) == STEPS and r0["kept"] == r1["kept"]
    assert r0["scores"].keys() == r1["scores"].keys() and r0["scores"]
    for step, units in r0["scores"].items():
        for name, scores in units.items():
            torch.testing.assert_close(torch.tensor(scores), torch.tensor(r1["scores"][step][name]), msg=f"step {step}: {name}")
    assert any(len(k) < 96 for k in r0["kept"]["0"].values())  # sparse steps really omitted something
    if metric != "magnitude":
        return  # activation norms of a rank's half batch differ from the whole batch's: only rank agreement is owed
    _run(single, metric, batch=4, processes=1)
    assert _kept(single, 0)["kept"] == r0["kept"]
    a, b = torch.load(ddp / "final.pt"), torch.load(single / "final.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


def test_ddp_context_split_matches_one_process(tmp_path):
    """sparse_tokens context under DDP: each rank splits its own half batch at the MLP blocks, and the
    averaged step equals one process's over the whole batch (a data-independent metric: the same kept sets)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run(ddp, "magnitude", batch=2, processes=2, tokens="context")
    _run(single, "magnitude", batch=4, processes=1, tokens="context")
    r0 = _kept(ddp, 0)
    assert r0["kept"] == _kept(ddp, 1)["kept"] == _kept(single, 0)["kept"]
    assert any(len(k) < 96 for k in r0["kept"]["0"].values())
    a, b = torch.load(ddp / "final.pt"), torch.load(single / "final.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("metric", ["wanda", "magnitude"])
def test_fsdp2_sharded_step_matches_unsharded(tmp_path, metric):
    """fully_shard per decoder layer: SAT slices the unsharded parameters inside the layer's forward."""
    from reference import loss_and_grads
    from tiny import batch, build, sat_config

    from sat_trainer import apply_sat

    _launch([str(Path(__file__).parent / "fsdp_worker.py"), str(tmp_path), metric], 2, {})
    sharded = torch.load(tmp_path / "fsdp.pt")

    model = build("llama")
    handle = apply_sat(model, sat_config(omission_rate=0.5, metric=metric))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    loss, _, grads = loss_and_grads(model, batch())
    assert all(torch.equal(sharded["kept"][n], k) for n, k in handle.kept().items())
    torch.testing.assert_close(sharded["loss"], loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(sharded["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
