"""Every script in examples/ runs on its offline tiny model and does what it says: SAT active in the training
steps (kept sets smaller than the blocks), losses finite, and a plain model saved."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import transformers

from sat_trainer.patch.model import handle_of

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    """Load examples/<name>.py as its own module, its folder on sys.path as when run as a script."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    sys.modules.pop("tiny_model", None)  # tests/tiny.py and examples/tiny_model.py stay apart


def _sat_callback(trainer):
    [callback] = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "SATCallback"]
    return callback


def _training_rows(trainer) -> list[dict]:
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    return rows


def test_trainer_callback(example, tmp_path):
    trainer = example("trainer_callback").main(["--output-dir", str(tmp_path), "--max-steps", "8"])
    rows = _training_rows(trainer)
    assert [r["sat/omission_rate"] for r in rows] == [0.0] * 3 + [0.5] * 5  # the default dense start, then 0.5
    handle = _sat_callback(trainer).handle
    assert handle.units and all(len(k) == 128 for k in handle.kept().values())  # half of 256 channels kept
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").config.model_type == "llama"


def test_sft_lora_trl(example, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    trainer = example("sft_lora_trl").main(["--output-dir", str(tmp_path), "--max-steps", "8"])
    rows = _training_rows(trainer)
    assert rows[-1]["sat/omission_rate"] == 0.5
    handle = _sat_callback(trainer).handle
    dense_rows, sparse_rows = handle.token_split  # sparse_tokens context: completions dense, prompts sparse
    assert dense_rows.numel() and sparse_rows.numel()
    assert all(len(k) == 128 for name, k in handle.kept().items() if name.endswith("mlp"))
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # merged: no LoRA modules left
    assert not any("lora" in name for name, _ in saved.named_parameters())


def test_custom_loop(example, tmp_path):
    result = example("custom_loop").main(["--output-dir", str(tmp_path), "--steps", "8"])
    history = result["history"]
    assert [h["rate"] for h in history] == [0.0] * 3 + [0.5] * 5
    assert all(math.isfinite(h["loss"]) for h in history)
    assert all(set(h["kept"].values()) == {256} for h in history[:3])  # dense start: everything kept
    assert all(set(h["kept"].values()) == {128} for h in history[3:])  # then half, drawn each step
    assert handle_of(result["model"]) is None  # remove_sat put the original forwards back
    assert (tmp_path / "final" / "config.json").exists()
