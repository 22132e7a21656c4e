"""SATConfig: YAML loading (top level or under `sat:`) and one clear error per bad value."""

from __future__ import annotations

import pytest

from sat_trainer import SATCallback, SATConfig, SATConfigError
from sat_trainer.config import field_help


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


def test_readme_settings_table_matches_the_config():
    """The README's SAT settings table lists every key with its real default."""
    import dataclasses
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", readme, flags=re.M))
    defaults = SATConfig().to_dict()
    assert rows.keys() == {f.name for f in dataclasses.fields(SATConfig)}
    assert {k: yaml.safe_load(v) for k, v in rows.items()} == defaults
