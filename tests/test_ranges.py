"""Ranges of numeric settings and the scenario's fit to the model: every numeric field of
TrainingArguments and LoraConfig has a range; the values at its edges are accepted by
transformers itself (the range is not stricter than the library) and those just outside are
refused with one line; builtin models' known shapes are those of the real models."""

from __future__ import annotations

import dataclasses
import re

import peft
import pytest
import transformers

from sat_trainer import SATConfig
from sat_trainer.app.fields import _hints, _options
from sat_trainer.app.model_source import check_model
from sat_trainer.app.ranges import LORA, TRAINING, Range, ints, numbers
from sat_trainer.app.training_args import check_training
from sat_trainer.errors import SATConfigError

# what some fields need beside them to be accepted at all
CONTEXT = {"dataloader_prefetch_factor": {"dataloader_num_workers": 1}}


def _numeric_fields(cls: type) -> set[str]:
    """Fields whose type is only int/float (optionally None): those a range applies to."""
    out = set()
    for name, hint in _hints(cls).items():
        options = [o for o in _options(hint) if o is not type(None)]
        if options and all(o in (int, float) for o in options) and name in {f.name for f in dataclasses.fields(cls)}:
            out.add(name)
    return out


def test_every_numeric_field_has_a_range():
    assert _numeric_fields(transformers.TrainingArguments) == set(TRAINING)
    assert _numeric_fields(peft.LoraConfig) == set(LORA)


def _edges(allowed: Range) -> tuple[list, list]:
    """(values just inside the range, values just outside it)."""
    step = 1 if allowed.integer else 0.5
    inside, outside = list(allowed.also), [] if allowed.integer else [float("nan")]
    if allowed.low is not None:
        inside.append(allowed.low + step if allowed.low_open else allowed.low)
        outside.append(allowed.low if allowed.low_open else allowed.low - step)
    if allowed.high is not None:
        inside.append(allowed.high - (0.001 if allowed.high_open else 0))
        outside.append(allowed.high if allowed.high_open else allowed.high + step)
    return inside, outside


@pytest.mark.parametrize("key", sorted(TRAINING))
def test_training_ranges_match_what_transformers_accepts(key):
    inside, outside = _edges(TRAINING[key])
    for value in inside:
        check_training({"output_dir": "out", "max_steps": 10, **CONTEXT.get(key, {}), key: value}, has_eval=True)
    for value in outside:
        with pytest.raises(
            SATConfigError, match=rf"^key 'training\.{key}' has invalid value .*; allowed: {re.escape(TRAINING[key].describe())}$"
        ):
            check_training({"output_dir": "out", "max_steps": 10, **CONTEXT.get(key, {}), key: value}, has_eval=True)


@pytest.mark.parametrize("key", sorted(LORA))
def test_lora_ranges_match_what_peft_accepts(key):
    inside, outside = _edges(LORA[key])
    for value in inside:
        peft.LoraConfig(task_type="CAUSAL_LM", **{key: value})
    for value in outside:
        with pytest.raises(SATConfigError, match=rf"^key 'lora\.{key}' has invalid value"):
            LORA[key].check(f"lora.{key}", value)


def test_range_wording():
    assert ints(1).describe() == "an integer >= 1"
    assert ints(1, also=(-1,)).describe() == "-1 or an integer >= 1"
    assert ints(1, nullable=True).describe() == "null or an integer >= 1"
    assert numbers(0, 1, high_open=True).describe() == "a number in [0, 1)"
    assert numbers(0, low_open=True).describe() == "a number > 0"
    assert not numbers(0).allows(float("inf")) and not ints(0).allows(True) and not ints(0).allows(2.0)


def test_run_time_check_reads_the_model_config(tiny_base):
    """A hub or builtin model is checked on its AutoConfig before data or weights load."""
    check_model(str(tiny_base), sat=SATConfig(dense_layers=[0, -2]), lora=None, max_length=1024)
    with pytest.raises(SATConfigError, match=r"'sat\.dense_layers' has invalid value \[5\]: .* has 2 layers"):
        check_model(str(tiny_base), sat=SATConfig(dense_layers=[5]), lora=None, max_length=64)
    with pytest.raises(SATConfigError, match=r"'data\.max_length' has invalid value 2048; allowed: an integer from 8 to 1024"):
        check_model(str(tiny_base), sat=None, lora=None, max_length=2048)
    check_model(str(tiny_base), sat=None, lora=None, max_length=1024)  # a dense run: dense_layers do not matter


def test_builtin_shapes_are_those_of_the_real_models():
    from sat_trainer.app.builtin_models import MODEL_SHAPES, smollm2_dir
    from sat_trainer.app.pretrain import BASE_SHAPE, BLOCK_SIZE

    assert MODEL_SHAPES["base"] == {
        "num_hidden_layers": BASE_SHAPE["num_hidden_layers"],
        "max_position_embeddings": max(1024, BLOCK_SIZE),
    }
    if not (smollm2_dir() / "config.json").is_file():
        pytest.skip("SmolLM2 not converted on this machine (its GGUF says 30 layers, context 8192)")
    config = transformers.AutoConfig.from_pretrained(smollm2_dir())
    assert MODEL_SHAPES["smollm2-135m"] == {
        "num_hidden_layers": config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings,
    }
