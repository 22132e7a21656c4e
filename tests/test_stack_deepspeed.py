"""Real DeepSpeed ZeRO-2 and ZeRO-3: `transformers.Trainer` + `SATCallback` on 2 CPU processes
(DeepSpeed's CPU accelerator, gloo, the Trainer's torch AdamW), against one unsharded process
with the same global batch.

The two ranks start once (``deepspeed_worker.py`` runs every DeepSpeed case in one launch);
each test reads what they wrote. Compared: kept sets on both ranks and in the reference, the
rows each rank trained on, the loss per step, the first step's full gradients, the final
weights; a run resumed from the step-2 checkpoint against the uninterrupted one; and
``Trainer(model_init=...)`` under ZeRO-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (in the test extra: a missing install fails here, not as a skip)
import pytest
import torch

pytestmark = pytest.mark.slow  # minutes on a CPU: pytest -m "not slow" leaves it out

WORKER = Path(__file__).parent / "deepspeed_worker.py"
STAGES = (2, 3)


def _launch(args: list[str], env: dict) -> None:
    proc = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env},
        timeout=300,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"worker exited with {proc.returncode}:\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every DeepSpeed run on 2 ranks, then the unsharded reference; returns their folder."""
    out = tmp_path_factory.mktemp("deepspeed")
    _launch(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)], {"DS_ACCELERATOR": "cpu"}
    )
    _launch([str(WORKER), str(out), "--single"], {})
    return out


def _ranks(out: Path, name: str) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"{name}_rank{r}.json").read_text()) for r in (0, 1))


def _single(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "single_rank0.json").read_text()), torch.load(out / "single.pt")


def _assert_close(a: dict, b: dict, what: str, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=f"{what}: {name}")


@pytest.mark.parametrize("stage", STAGES)
def test_zero_ranks_agree_and_match_one_process(runs, stage):
    r0, r1 = _ranks(runs, f"zero{stage}")
    single, single_tensors = _single(runs)
    assert r0["kept"] == r1["kept"] == single["kept"] and len(r0["kept"]) == 4
    assert any(len(k) < 96 for k in r0["kept"]["0"].values())  # the sparse steps really omitted channels
    for step, rows in enumerate(single["rows"]):  # data parallel: each rank trained on its half of the global batch
        assert sorted(r0["rows"][step] + r1["rows"][step]) == sorted(rows) and r0["rows"][step] != r1["rows"][step]
    mean_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(single["losses"]), atol=1e-5, rtol=1e-5)
    tensors = torch.load(runs / f"zero{stage}.pt")
    _assert_close(tensors["grads"], single_tensors["grads"], f"ZeRO-{stage} first-step gradient")
    _assert_close(tensors["final"], single_tensors["final"], f"ZeRO-{stage} final weight")


def test_zero3_partitions_at_build_and_sat_blocks_are_leaves(runs):
    """ZeRO-3 built the model inside zero.Init (apply_sat met empty shards) and the engine made the
    patched blocks leaves; under ZeRO-2 nothing is partitioned or a leaf."""
    z3, z2 = _ranks(runs, "zero3")[0], _ranks(runs, "zero2")[0]
    assert z3["partitioned"] and z3["leaves"] == ["LlamaAttention", "LlamaMLP"]
    assert not z2["partitioned"] and z2["leaves"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_zero_resume_continues_the_same_run(runs, stage):
    """A new Trainer resumed from the step-2 checkpoint (DeepSpeed's engine, optimizer and the SAT
    draw counter) draws the same kept sets, sees the same rows and ends at the same weights."""
    full, resumed = _ranks(runs, f"zero{stage}"), _ranks(runs, f"zero{stage}-resumed")
    for a, b in zip(full, resumed):
        assert list(b["kept"]) == ["2", "3"] and b["kept"] == {k: a["kept"][k] for k in ("2", "3")}
        assert b["rows"] == a["rows"][2:]
        torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"][2:]), atol=1e-6, rtol=1e-6)
    _assert_close(
        torch.load(runs / f"zero{stage}-resumed.pt")["final"],
        torch.load(runs / f"zero{stage}.pt")["final"],
        f"ZeRO-{stage} resumed final weight",
        atol=1e-6,
        rtol=1e-6,
    )


def test_zero3_model_init_trains_like_model(runs):
    """Trainer(model_init=...) under ZeRO-3: the engine is built on a model no callback has seen;
    SATCallback named its block classes in the DeepSpeed config at on_init_end, so the engine made
    them leaves, and the run equals the model=... run and the unsharded one."""
    r0, r1 = _ranks(runs, "zero3_model_init")
    assert "error" not in r0, r0.get("error")
    assert r0["partitioned"] and r0["leaves"] == ["LlamaAttention", "LlamaMLP"]
    single, single_tensors = _single(runs)
    assert r0["kept"] == r1["kept"] == single["kept"]
    assert (r0["losses"], r1["losses"]) == (_ranks(runs, "zero3")[0]["losses"], _ranks(runs, "zero3")[1]["losses"])
    _assert_close(torch.load(runs / "zero3_model_init.pt")["final"], single_tensors["final"], "model_init final weight")
