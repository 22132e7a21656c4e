"""Shared fixtures: tests are seeded and run on the CPU's default thread count; one tiny
pretrained base (tokenizer and model built from the shipped corpus in seconds) per session."""

import pytest
import torch

TINY_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_steps=2)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A `sat-train pretrain-base` folder of a tiny Llama (vocab 300, under 100k parameters)."""
    from sat_trainer.app.pretrain import build_base

    out = tmp_path_factory.mktemp("base")
    info = build_base(out, vocab_size=300, block_size=64, **TINY_BASE)
    assert info["parameters"] < 100_000 and set(info["validation_loss"]) == {"base", "continual"}
    return out
