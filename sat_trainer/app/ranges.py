"""Allowed ranges of the numbers in a scenario, checked before anything loads.

``fields.py`` checks types; a value of the right type can still be impossible
(``per_device_train_batch_size: 0``, ``learning_rate: -1``, ``seed: -1``), and transformers,
torch or numpy reject it only after the model and data loaded, as a traceback (a zero eval
batch size only once training has run). The tables below give every numeric field of
``TrainingArguments`` and ``peft.LoraConfig`` the range those libraries accept, so the error is
one line naming the key, the value and what is allowed. NaN and infinities are never allowed.
"""

from __future__ import annotations

from typing import Any

from ..value_range import Range, ints, numbers

SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers.set_seed passes the seed to


# Every int/float field of transformers.TrainingArguments (tests/test_ranges.py fails when a new one appears).
TRAINING = {
    "per_device_train_batch_size": ints(1),
    "per_device_eval_batch_size": ints(1),
    "gradient_accumulation_steps": ints(1),
    "eval_accumulation_steps": ints(1),
    "num_train_epochs": numbers(0, low_open=True),
    "max_steps": ints(1, also=(-1,)),  # -1: train num_train_epochs; 0 would silently mean the same
    "learning_rate": numbers(0),  # torch optimizers refuse a negative rate
    "warmup_steps": numbers(0),  # below 1: a fraction of the steps
    "weight_decay": numbers(0),
    "adam_beta1": numbers(0, 1, high_open=True),
    "adam_beta2": numbers(0, 1, high_open=True),
    "adam_epsilon": numbers(0),
    "max_grad_norm": numbers(0),  # 0: no clipping
    "label_smoothing_factor": numbers(0, 1, high_open=True),
    "neftune_noise_alpha": numbers(0),
    "torch_empty_cache_steps": ints(1),
    "logging_steps": numbers(0, low_open=True),  # below 1: a fraction of the steps
    "eval_steps": numbers(0, low_open=True),
    "eval_delay": numbers(0),
    "save_steps": numbers(0, low_open=True),
    "save_total_limit": ints(0),  # 0: keep every checkpoint
    "seed": ints(0, SEED_MAX),
    "data_seed": ints(0, SEED_MAX),
    "dataloader_num_workers": ints(0),
    "dataloader_prefetch_factor": ints(1),
    "ddp_bucket_cap_mb": ints(1),
    "ddp_timeout": ints(1),
    "local_rank": ints(-1),
}

# Every int/float-only field of peft.LoraConfig.
LORA = {
    "r": ints(1),
    "lora_alpha": ints(1),
    "lora_dropout": numbers(0, 1, high_open=True),  # 1 would drop every input of the adapter
    "qalora_group_size": ints(1),
}


def check_section(values: dict[str, Any], table: dict[str, Range], section: str) -> None:
    """Range-check the keys of ``values`` that ``table`` knows. A null was already accepted or
    refused by the field's type (``fields.py``), so it is not checked again here."""
    for key, value in values.items():
        if key in table and value is not None:
            table[key].check(f"{section}.{key}", value)
