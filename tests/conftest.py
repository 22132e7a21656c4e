"""Shared fixtures: tests are seeded and run on the CPU's default thread count; one tiny
pretrained base (tokenizer and model built from the shipped corpus in seconds) per session."""

import os

import pytest
import torch

# sat-train keeps freed memory in the process (sat_trainer.app.cpu_memory); tests that call its main() in this
# process leave malloc as it is, so no test's memory use depends on which ran before (test_cpu_memory runs it apart)
os.environ.setdefault("SAT_TRAINER_KEEP_CPU_MEMORY", "0")

TINY_BASE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_steps=2
)


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
