"""SATConfig: YAML loading (top level or under `sat:`) and one clear error per bad value."""

from __future__ import annotations

import typing

import pytest

from sat_trainer import SATCallback, SATConfig, SATConfigError
from sat_trainer.config import METRICS, SELECTIONS, Metric, Selection, field_help


def test_yaml_top_level_and_sat_block(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("omission_rate: 0.3\nmetric: magnitude\ntargets: [mlp]\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: foo\ntraining: {max_steps: 3}\nsat:\n  omission_rate: 0.3\n  metric: magnitude\n  targets: mlp\n")
    a, b = SATConfig.from_yaml(top), SATConfig.from_yaml(nested)
    assert a == b
    assert (a.omission_rate, a.metric, a.targets, a.selection) == (0.3, "magnitude", ["mlp"], SATConfig().selection)


def test_callback_accepts_yaml_path_and_dict(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sat: {schedule: cosine, seed: 7}\n")
    assert SATCallback(path).config == SATCallback({"schedule": "cosine", "seed": 7}).config


@pytest.mark.parametrize(
    "data,key,fragment",
    [
        ({"omision_rate": 0.5}, "omision_rate", "allowed keys"),
        ({"omission_rate": 1.0}, "omission_rate", "[0, 1)"),
        ({"omission_rate": -0.1}, "omission_rate", "[0, 1)"),
        ({"omission_rate": "half"}, "omission_rate", "float"),
        ({"metric": "snip"}, "metric", "uniform, magnitude, wanda, maxip"),
        ({"selection": "greedy"}, "selection", "topk, sampling"),
        ({"temperature": 0}, "temperature", "> 0"),
        ({"schedule": "step"}, "schedule", "ladder, constant, linear, cosine"),
        ({"targets": ["mlp", "embeddings"]}, "targets", "'mlp', 'attention'"),
        ({"targets": []}, "targets", "non-empty"),
        ({"seed": 1.5}, "seed", "int"),
        ({"ladder_sparse_fraction": 1.0}, "ladder_sparse_fraction", "(0, 1)"),
        ({"ladder_num_rungs": 0}, "ladder_num_rungs", ">= 1"),
        ({"ladder_rungs": [[0.0, 0.5], [0.8, 0.2]]}, "ladder_rungs", "last rate 0"),
        ({"ladder_rungs": [[0.1, 0.5], [0.8, 0.0]]}, "ladder_rungs", "first start 0"),
        ({"draw_every": "epoch"}, "draw_every", "step, micro_batch"),
        ({"maxip_tokens": 0}, "maxip_tokens", ">= 1"),
        ({"temperature": True}, "temperature", "float"),
        ({"omitted_update": "momentum", "sparse_tokens": "context"}, "omitted_update", "discard"),
        ({"omitted_update": "freeze", "sparse_tokens": "context"}, "omitted_update", "discard"),
        ({"momentum_decay": 1.5, "omitted_update": "momentum"}, "momentum_decay", "[0, 1]"),
        ({"momentum_decay": 0.97, "omitted_update": "optimizer"}, "momentum_decay", "unless omitted_update is momentum"),
        ({"omit_in": "sideways"}, "omit_in", "forward_backward, backward, weight_gradient"),
        ({"metric": 3}, "metric", "uniform, magnitude"),
        ({"targets": "embeddings"}, "targets", "'mlp', 'attention'"),
        ({"targets": ["mlp", "mlp"]}, "targets", "without repeats"),
        ({"ladder_num_rungs": 2.0}, "ladder_num_rungs", "int"),
        ({"loss_budget": float("nan")}, "loss_budget", "> 0"),
        ({"activation_token_fraction": 0}, "activation_token_fraction", "(0, 1]"),
        ({"calibration_rates": [0.5, 0.25]}, "calibration_rates", "ascending list of rates in (0, 1)"),
        ({"calibration_rates": [0.5, 1.0]}, "calibration_rates", "ascending list of rates in (0, 1)"),
        ({"dense_layers": [0, 1.5]}, "dense_layers", "layer indices"),
        ({"ladder_rungs": "ladder"}, "ladder_rungs", "[start_fraction, rate] pairs"),
        ({"layer_rates": "auto", "omission_rate": 0}, "layer_rates", "omission_rate > 0"),
    ],
)
def test_bad_values_name_key_value_and_allowed(data, key, fragment):
    with pytest.raises(SATConfigError) as err:
        SATConfig.from_dict(data)
    message = str(err.value)
    assert repr(key) in message and fragment in message
    assert repr(next(iter(data.values()))) in message


def test_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sat:\n  metric: snip\n")
    with pytest.raises(SATConfigError, match=r"bad\.yaml: .*'metric' has invalid value 'snip'"):
        SATConfig.from_yaml(path)
    with pytest.raises(SATConfigError, match="not found"):
        SATConfig.from_yaml(tmp_path / "missing.yaml")


def test_every_field_has_help():
    assert all(text.strip() for text in field_help().values())


def test_enum_values_come_from_the_literal_annotations():
    assert METRICS == typing.get_args(Metric) and "activation" in METRICS
    assert SELECTIONS == typing.get_args(Selection) == ("topk", "sampling")
    hints = typing.get_type_hints(SATConfig)
    assert typing.get_origin(hints["omit_in"]) is typing.Literal and typing.get_origin(hints["targets"]) is list


def test_valid_values_are_kept_as_given_and_normalised():
    cfg = SATConfig(
        targets=("attention", "mlp"),
        dense_layers=(0, -1),
        calibration_rates=[0.2, 1 / 2],
        temperature=2,
        ladder_rungs=[[0, 0.5], [0.5, 0]],
        schedule="ladder",
        omit_in="forward_backward",
        compensation="mean",
    )
    assert cfg.targets == ["attention", "mlp"] and cfg.dense_layers == [0, -1] and cfg.calibration_rates == [0.2, 0.5]
    assert cfg.temperature == 2 and cfg.ladder_rungs == [[0, 0.5], [0.5, 0]]
    assert SATConfig.from_dict(cfg.to_dict()) == cfg
