"""`Trainer(model_init=...)`: the Trainer builds its model inside `train()`, after `on_init_end`;
SATCallback must patch that model (not only the one built at init) and log its state."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import VOCAB, build, sat_config

from sat_trainer import SATCallback
from sat_trainer.patch.model import handle_of


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = (torch.arange(16) + i) % VOCAB
        return {"input_ids": ids, "labels": ids}


class _KeptSizes(transformers.TrainerCallback):
    """Kept MLP channels per step, read from the model the Trainer actually trains."""

    def __init__(self):
        self.sizes = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        handle = handle_of(model)
        self.sizes.append(None if handle is None else len(handle.kept()["model.layers.0.mlp"]))


@pytest.mark.slow
def test_model_init_model_is_patched_and_logged(tmp_path):
    built = []

    def init():
        built.append(build("llama"))
        return built[-1]

    sat = sat_config(omission_rate=0.5, targets=["mlp"], ladder_sparse_fraction=0.5, ladder_num_rungs=1)
    kept = _KeptSizes()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model_init=init, args=args, train_dataset=_Rows(), callbacks=[SATCallback(sat), kept])
    trainer.train()
    assert len(built) == 2 and trainer.model is built[1]  # init built one, train() another
    assert handle_of(built[1]) is not None
    assert kept.sizes == [48, 48, 96, 96]  # the trained model's forwards were sparse, then dense
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["sat/omission_rate"] for r in rows] == [0.5, 0.5, 0.0, 0.0]
    assert rows[0]["sat/kept_flops_fraction"] < 1.0 and rows[-1]["sat/kept_flops_fraction"] == 1.0


@pytest.mark.parametrize("bad", [0.5, ["mlp"], object()])
def test_callback_refuses_what_is_not_a_config(bad):
    from sat_trainer import SATConfigError

    with pytest.raises(SATConfigError, match=r"SAT config must be a SATConfig, a mapping of its keys .* got "):
        SATCallback(bad)


def test_apply_sat_accepts_a_mapping_and_refuses_other_things():
    from sat_trainer import SATConfigError, apply_sat, remove_sat

    model = build("llama")
    handle = apply_sat(model, {"omission_rate": 0.3, "targets": ["mlp"]})
    assert handle.config.omission_rate == 0.3 and {u.kind for u in handle.units} == {"mlp"}
    remove_sat(model)
    with pytest.raises(SATConfigError, match="got float 0.5"):
        apply_sat(model, 0.5)
    with pytest.raises(SATConfigError, match="unknown SAT config key 'rate'"):
        apply_sat(model, {"rate": 0.5})


def test_zero3_model_init_refused_when_the_engine_made_no_leaves():
    """The ZeRO-3 model_init check (the run itself is in test_stack_deepspeed): a model whose blocks
    DeepSpeed did not register as leaves is unpatched again and refused, naming the blocks and the fix."""
    from sat_trainer import apply_sat
    from sat_trainer.callback import _require_engine_leaves
    from sat_trainer.errors import SATError

    model = build("llama")
    handle = apply_sat(model, sat_config())
    with pytest.raises(SATError, match=r"did not make model\.layers\.0\.self_attn, .* zero_optimization\.leaf_module\.classes"):
        _require_engine_leaves(model, handle)
    assert handle_of(model) is None
    for p in model.parameters():
        p.ds_z3_leaf_module = None  # what DeepSpeed sets on a registered leaf's parameters
    _require_engine_leaves(model, apply_sat(model, sat_config()))
