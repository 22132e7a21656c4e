"""TRL's SFTTrainer with SATCallback: its own model wrapping keeps working, SAT follows the schedule."""

from __future__ import annotations

import datasets
import pytest
import transformers
from tiny import build, sat_config

from sat_trainer import SATCallback
from sat_trainer.app.data import corpus
from sat_trainer.app.data.tokenizer import train_tokenizer
from sat_trainer.patch.model import handle_of
from sat_trainer.schedule import omission_rate_at

pytestmark = pytest.mark.slow  # minutes on a CPU: pytest -m "not slow" leaves it out

trl = pytest.importorskip("trl")


class _Sizes(transformers.TrainerCallback):
    def __init__(self):
        self.sizes = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.sizes[state.global_step] = sorted({len(k) for k in handle_of(model).kept().values()})


def test_sft_trainer_with_sat(tmp_path):
    tokenizer = train_tokenizer(corpus.shakespeare("base", "train")[:2], vocab_size=96)
    model = build("llama", vocab_size=len(tokenizer))
    records = corpus.chatterbot("train")[:64]
    dataset = datasets.Dataset.from_list(records)
    sat = sat_config(omission_rate=0.5, ladder_sparse_fraction=0.5, ladder_num_rungs=1)
    sizes = _Sizes()
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        max_length=48,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[SATCallback(sat), sizes]
    )
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["sat/omission_rate"] for r in rows] == [omission_rate_at(sat, s, 8) for s in range(8)]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite
    assert sizes.sizes[0] == [4, 48] and sizes.sizes[7] == [8, 96]  # heads / channels kept: sparse, then dense
