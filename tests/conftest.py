"""Shared fixtures: tests are seeded and run on the CPU's default thread count."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
