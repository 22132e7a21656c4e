"""The axolotl plugin (sat_trainer.integrations.axolotl) with axolotl's own config model, plugin manager and,
where its training stack imports, `axolotl train` end to end on a tiny local model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from tiny import VOCAB, build

from sat_trainer import SATCallback
from sat_trainer.errors import SATError
from sat_trainer.patch.model import handle_of

pytest.importorskip("axolotl")
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.utils.config import prepare_plugins, validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

PLUGIN = "sat_trainer.integrations.axolotl.SATPlugin"
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


def _manager() -> PluginManager:
    """axolotl's plugin manager (a process-wide singleton) with the SAT plugin registered, as `plugins:` does."""
    manager = PluginManager.get_instance()
    manager.register(PLUGIN)
    return manager


def _cfg(**extra) -> DictDefault:
    """An axolotl config as `axolotl train` reads it from YAML, with the SAT plugin listed."""
    cfg = dict(
        base_model="unused-by-validation",
        plugins=[PLUGIN],
        datasets=[{"path": "data.jsonl", "ds_type": "json", "type": "completion"}],
        micro_batch_size=1,
        num_epochs=1,
        learning_rate=1e-3,
        sequence_len=64,
        output_dir="out",
    )
    return DictDefault({**cfg, **extra})


def _validated(**extra) -> DictDefault:
    cfg = _cfg(**extra)
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_sat_block_is_validated_with_axolotls_config():
    cfg = _validated(sat={"omission_rate": 0.5, "targets": ["mlp", "attention"]})
    assert cfg.sat == {"omission_rate": 0.5, "targets": ["mlp", "attention"]}
    assert _validated().sat is None  # no sat: block: SATConfig's defaults


@pytest.mark.parametrize(
    "sat, message",
    [
        ({"omission_rate": 1.5}, "SAT config key 'omission_rate' has invalid value 1.5; allowed: a number in [0, 1)"),
        ({"bogus": 1}, "unknown SAT config key 'bogus' (value 1); allowed keys:"),
        ([0.5], "SAT config must be a mapping of keys to values, got list"),
    ],
)
def test_a_bad_sat_block_stops_validation_with_satconfigs_message(sat, message):
    with pytest.raises(ValueError, match=re.escape("sat: " + message)):
        _validated(sat=sat)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({**LORA, "load_in_8bit": True}, "cannot run on a quantised base (load_in_8bit)"),
        ({**LORA, "adapter": "qlora", "load_in_4bit": True}, "cannot run on a quantised base (load_in_4bit, adapter: qlora)"),
        ({**LORA, "lora_qkv_kernel": True}, "cannot run with lora_qkv_kernel"),
    ],
)
def test_what_sat_cannot_run_under_is_refused_at_validation(extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _validated(**extra)


def test_lora_kernels_axolotl_would_enable_default_to_off():
    """axolotl turns its fused LoRA kernels on for LoRA when unset; they would bypass SAT's sliced forwards."""
    cfg = _validated(**LORA)
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (False, False, False)


def test_an_unsupported_model_type_is_refused_before_the_model_loads():
    manager = _manager()
    with pytest.raises(SATError, match="model_type 'mamba' .* is not supported by sat_trainer; supported: .*llama"):
        manager.pre_model_load(DictDefault(model_config_type="mamba", base_model="state-spaces/mamba-130m"))
    manager.pre_model_load(DictDefault(model_config_type="llama"))


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer(model, callbacks, tmp_path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)


def test_the_callback_axolotl_hands_the_trainer_patches_the_model(tmp_path):
    """The plugin manager's pre-trainer callbacks go to the Trainer's constructor, as axolotl's builder passes
    them: the model is patched at on_init_end, and training runs sparse at the configured rate."""
    manager = _manager()
    model = build("llama")
    cfg = _validated(
        sat={"omission_rate": 0.5, "targets": ["mlp", "attention"], "schedule": "constant", "dense_warmup_fraction": 0.0}
    )
    callbacks = manager.add_callbacks_pre_trainer(cfg, model)
    [sat] = [c for c in callbacks if isinstance(c, SATCallback)]
    assert sat.config.omission_rate == 0.5 and handle_of(model) is None
    trainer = _trainer(model, callbacks, tmp_path)
    assert handle_of(model) is sat.handle and {u.kind for u in sat.handle.units} == {"mlp", "attention"}
    trainer.train()
    assert sat.handle.rate == 0.5 and sat.handle.kept_flops_fraction() < 1


def test_the_engine_refuses_a_dora_adapter_when_the_trainer_is_built(tmp_path):
    """DoRA (axolotl's peft_use_dora) is refused by the engine as it patches, with its own message."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        build("llama"), peft.LoraConfig(r=4, target_modules=["up_proj", "down_proj", "gate_proj"], use_dora=True)
    )
    [callback] = _manager().add_callbacks_pre_trainer(_validated(sat={"omission_rate": 0.5}), model)
    with pytest.raises(SATError, match="SAT cannot slice"):
        _trainer(model, [callback], tmp_path)


@pytest.mark.slow
def test_axolotl_train_runs_sat_end_to_end(tmp_path):
    """`axolotl train` on a tiny Llama and BPE tokenizer saved locally, a jsonl of text, the plugin and a sat:
    block: the run finishes, logs SAT's columns, and its sparse steps keep under all the FLOPs."""
    pytest.importorskip(
        "axolotl.core.builders", reason="axolotl's training stack does not import here (see .ci/run for what it needs)"
    )
    from sat_trainer.app.data.tokenizer import train_tokenizer

    texts = [f"line {i}: the quick brown fox jumps over the lazy dog number {i % 7}." for i in range(64)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    base = tmp_path / "base"
    tokenizer.save_pretrained(base)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    yaml_text = f"""
base_model: {base}
plugins:
  - {PLUGIN}
sat:
  omission_rate: 0.5
  targets: [mlp, attention]
  schedule: constant
  dense_warmup_fraction: 0.0
datasets:
  - path: {tmp_path / "data.jsonl"}
    ds_type: json
    type: completion
dataset_prepared_path: {tmp_path / "prepared"}
val_set_size: 0
sequence_len: 64
micro_batch_size: 2
num_epochs: 1
max_steps: 3
learning_rate: 0.001
optimizer: adamw_torch
lr_scheduler: constant
output_dir: {tmp_path / "out"}
bf16: false
fp16: false
tf32: false
save_strategy: "no"
logging_steps: 1
"""
    (tmp_path / "axolotl.yml").write_text(yaml_text)
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(tmp_path / "axolotl.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    kept = [float(v) for v in re.findall(r"'sat/kept_flops_fraction': '([\d.]+)'", output)]
    assert len(kept) == 3 and all(k < 1 for k in kept), output[-4000:]
