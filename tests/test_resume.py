"""`sat-train` checkpoints and resume: a resumed run ends exactly where the uninterrupted one
does (omission schedule, draws, data order, losses), reads the model from the checkpoint and
not from a base folder changed since, and a run folder holding checkpoints is never silently
restarted."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from tiny import demo_run_args

from sat_trainer.app.cli import main

pytestmark = pytest.mark.slow  # minutes on a CPU: pytest -m "not slow" leaves it out


def _report(folder):
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def full_run(tiny_base, tmp_path_factory):
    """8 steps with a checkpoint every 4 (save_steps alone turns saving on), from a copy of the base."""
    root = tmp_path_factory.mktemp("resume")
    base = shutil.copytree(tiny_base, root / "base")
    out = root / "full"
    assert main(demo_run_args("cpt", base, out, 8, "training.save_steps=4")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    return base, out, _report(out)


def _change_base(base):
    """The base folder now holds another model (other width): a run that read it would fail to load the checkpoint."""
    config = transformers.AutoConfig.from_pretrained(base)
    config.hidden_size, config.intermediate_size = 16, 32
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)


def test_resumed_run_matches_the_uninterrupted_one_even_if_the_base_changed(full_run, tmp_path):
    base, full, expected = full_run
    shutil.copytree(full / "checkpoint-4", tmp_path / "checkpoint-4")
    _change_base(base)
    assert main([*demo_run_args("cpt", base, tmp_path, 8, "training.save_steps=4"), "--resume"]) == 0
    got = _report(tmp_path)
    assert got["resumed_from"] == str(tmp_path / "checkpoint-4") and expected["resumed_from"] is None
    assert got["steps"] == expected["steps"] == 8
    assert got["omission_schedule"] == expected["omission_schedule"] and 0.5 in got["omission_schedule"]
    assert got["held_out_loss"] == pytest.approx(expected["held_out_loss"], rel=1e-5)
    evals = [e["step"] for e in got["history"]["held_out"]]
    assert evals == [e["step"] for e in expected["history"]["held_out"]] and evals.count(0) == 1  # step 0 not evaluated again
    assert [r["loss"] for r in got["history"]["train_loss"]] == pytest.approx(
        [r["loss"] for r in expected["history"]["train_loss"]], rel=1e-5
    )


def test_resume_from_a_named_checkpoint_into_a_new_folder(full_run, tmp_path):
    base, full, expected = full_run
    assert (
        main(demo_run_args("cpt", base, tmp_path / "again", 8, f"training.resume_from_checkpoint={full / 'checkpoint-4'}")) == 0
    )
    got = _report(tmp_path / "again")
    assert got["omission_schedule"] == expected["omission_schedule"]
    assert got["held_out_loss"] == pytest.approx(expected["held_out_loss"], rel=1e-5)


def test_run_folder_with_checkpoints_is_refused_then_overwritten(full_run, capsys):
    base, full, _ = full_run
    assert main(demo_run_args("cpt", base, full, 8, "training.save_steps=4")) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    stale = full / "checkpoint-12"
    stale.mkdir()  # as if an earlier, longer run had left it: --overwrite must not let it survive
    assert main([*demo_run_args("cpt", base, full, 2), "--overwrite"]) == 0
    assert not list(full.glob("checkpoint-*")) and _report(full)["steps"] == 2


def test_resume_without_checkpoints_is_refused(tiny_base, tmp_path, capsys):
    assert main([*demo_run_args("cpt", tiny_base, tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_help_says_how_to_resume(capsys):
    with pytest.raises(SystemExit):
        main(["cpt", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--overwrite" in text and "latest checkpoint" in text
