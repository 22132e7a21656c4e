"""docs/configuration.md is generated from `SATConfig` and must not drift from it; the field metadata it reads
is complete and its help texts say what a setting does, not how one run went."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

from sat_trainer import SATConfig
from sat_trainer.config import GROUPS, field_docs

SCRIPT = Path(__file__).parents[1] / "scripts" / "config_reference.py"


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_reference"] = module
    spec.loader.exec_module(module)
    return module


def test_docs_configuration_md_is_generated_from_the_dataclass():
    reference = _reference()
    assert reference.DOC.is_file(), f"docs/configuration.md is missing; generate it: {reference.COMMAND}"
    assert reference.DOC.read_text(encoding="utf-8") == reference.render(), (
        f"docs/configuration.md differs from SATConfig's field metadata; regenerate it: {reference.COMMAND}"
    )
    assert reference.main(["--check"]) == 0


def test_every_field_is_in_the_reference_once_with_its_default():
    text = _reference().render()
    for doc in field_docs():
        rows = re.findall(rf"^\| `{doc.name}` \|.*$", text, flags=re.M)
        assert len(rows) == 1, doc.name
    assert len(field_docs()) == len(dataclasses.fields(SATConfig))
    assert {doc.name: doc.default for doc in field_docs()} == SATConfig().to_dict()


def test_every_field_has_a_known_group_and_every_group_a_field():
    groups = [doc.group for doc in field_docs()]
    assert set(groups) == set(GROUPS)


def test_help_texts_are_short_and_carry_no_measurements():
    """Run results (percentages, model names, dates, the journal) belong in docs/results.md, not in help."""
    for doc in field_docs():
        assert 0 < len(doc.help) <= 400, doc.name
        assert not re.search(r"%|SmolLM|\d{4}-\d{2}-\d{2}|benchmarks\.md|journal", doc.help), doc.name
    for group, description in GROUPS.items():
        assert not re.search(r"%|SmolLM|\d{4}-\d{2}-\d{2}|benchmarks\.md|journal", description), group


def test_check_fails_with_the_command_when_the_file_drifts(tmp_path, monkeypatch, capsys):
    reference = _reference()
    stale = tmp_path / "configuration.md"
    stale.write_text(reference.render().replace("| `0.5` |", "| `0.25` |"), encoding="utf-8")
    monkeypatch.setattr(reference, "DOC", stale)
    assert reference.main(["--check"]) == 1
    assert reference.COMMAND in capsys.readouterr().err


def test_docs_lte_configuration_md_is_generated_from_lte_config_and_drift_fails(tmp_path, monkeypatch, capsys):
    from sat_trainer.lte.config import GROUPS as LTE_GROUPS
    from sat_trainer.lte.config import LTEConfig
    from sat_trainer.settings import field_docs as settings_field_docs

    reference = _reference()
    assert reference.LTE_DOC.read_text(encoding="utf-8") == reference.render_lte(), (
        f"docs/lte_configuration.md differs from LTEConfig's field metadata; regenerate it: {reference.COMMAND}"
    )
    docs = settings_field_docs(LTEConfig)
    assert {doc.group for doc in docs} == set(LTE_GROUPS)
    text = reference.render_lte()
    assert all(len(re.findall(rf"^\| `{doc.name}` \|.*$", text, flags=re.M)) == 1 for doc in docs)
    stale = tmp_path / "lte_configuration.md"
    stale.write_text(text.replace("| `32` |", "| `64` |"), encoding="utf-8")
    monkeypatch.setattr(reference, "LTE_DOC", stale)
    assert reference.main(["--check"]) == 1
    assert "LTEConfig" in capsys.readouterr().err
