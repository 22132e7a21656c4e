"""Scenario YAMLs: every shipped config validates; bad ones fail before training, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sat_trainer.app.run_config import load_run_config
from sat_trainer.errors import SATConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _task(path: Path) -> str:
    return "pretrain" if path.stem.startswith("pretrain") else "sft" if "sft" in path.stem else "cpt"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    overrides = []
    if yaml.safe_load(path.read_text())["training"].get("bf16") and not torch.cuda.is_available():
        # TrainingArguments is built while validating, so a bf16 (GPU) config is refused up front on this CPU
        with pytest.raises(SATConfigError, match=r"key 'training': .*bf16"):
            load_run_config(_task(path), path)
        overrides = ["training.bf16=false"]
    cfg = load_run_config(_task(path), path, overrides)
    assert (cfg.sat is not None) != (cfg.lte is not None) and cfg.training["output_dir"].startswith("runs/")
    assert cfg.data.train


def test_real_use_scenarios_are_shipped():
    stems = {p.stem for p in CONFIGS}
    assert {"demo_cpt", "demo_sft", "tinyllama_1b_cpt", "llama2_7b_cpt", "llama2_7b_sft", "llama2_7b_sft_lora"} <= stems
    assert any(s.startswith("qwen") for s in stems)
    lora = load_run_config("sft", Path(__file__).parents[1] / "configs/llama2_7b_sft_lora.yaml", ["training.bf16=false"]).lora
    assert lora["r"] > 0


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_run_config(
        "cpt",
        CONFIGS[0].parent / "demo_cpt.yaml",
        ["training.max_steps=7", "sat.omission_rate=0.3", "sat.targets=[mlp]", "data.eval.extra=builtin:chatterbot"],
    )
    assert cfg.training["max_steps"] == 7 and cfg.sat.omission_rate == 0.3 and cfg.sat.targets == ["mlp"]
    assert cfg.data.eval["extra"] == "builtin:chatterbot"


def _write(tmp_path, **changes) -> Path:
    raw = yaml.safe_load((CONFIGS[0].parent / "demo_cpt.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"optimiser": "adam"}, r"unknown top-level key 'optimiser'"),
        ({"training__learning_rat": 0.1}, r"'training\.learning_rat'.*TrainingArguments"),
        ({"sat__omission_rate": 1.5}, r"'omission_rate' has invalid value 1\.5; allowed: a number in \[0, 1\)"),
        ({"sat__metric": "snip"}, r"'metric' has invalid value 'snip'"),
        ({"data__max_length": 4}, r"'data\.max_length' has invalid value 4"),
        ({"data__shuffle": True}, r"unknown key 'data\.shuffle'"),
        ({"lora": {"r": 8, "use_dora": True}}, r"'lora\.use_dora'.*cannot slice DoRA"),
        ({"lora": {"rank": 8}}, r"unknown key 'lora\.rank'"),
        ({"model": None}, r"key 'model' has invalid value None"),
    ],
)
def test_bad_configs_fail_with_one_clear_message(tmp_path, changes, pattern):
    with pytest.raises(SATConfigError, match=pattern) as err:
        load_run_config("cpt", _write(tmp_path, **changes))
    assert str(err.value).startswith(str(tmp_path / "bad.yaml"))


def test_bad_override_syntax():
    with pytest.raises(SATConfigError, match="expected key=value"):
        load_run_config("cpt", CONFIGS[0].parent / "demo_cpt.yaml", ["training.max_steps"])


def test_shipped_accelerate_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = Path(__file__).parents[1] / "configs" / "accelerate"
    configs = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert configs["single_gpu"].distributed_type == DistributedType.NO and configs["single_gpu"].num_processes == 1
    assert configs["multi_gpu"].distributed_type == DistributedType.MULTI_GPU
    assert configs["fsdp2"].distributed_type == DistributedType.FSDP and configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["zero3"].distributed_type == DistributedType.DEEPSPEED and configs["zero3"].deepspeed_config["zero_stage"] == 3
    assert all(c.mixed_precision == "bf16" for c in configs.values())


def test_numbers_written_as_yaml_strings_are_numbers(tmp_path):
    """`1e-4` is a string to YAML 1.1; it reaches TrainingArguments as a float, as do quoted numbers."""
    path = _write(tmp_path, training__max_steps="12", training__warmup_steps=0)
    cfg = load_run_config("cpt", path, ["training.learning_rate=1e-4", "training.weight_decay='0.01'", "sat.omission_rate=5e-1"])
    assert cfg.training["learning_rate"] == 1e-4 and cfg.training["weight_decay"] == 0.01 and cfg.training["max_steps"] == 12
    assert cfg.sat.omission_rate == 0.5
