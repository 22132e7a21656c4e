"""Bad input to `sat-train`, fed as a new user would: broken YAML, overrides, data files, model
paths, settings. Each case must end with exit status 2, one `sat-train: error:` line naming
what is wrong, no traceback, few lines, and no training step. The cases rejected before torch
is imported (a fraction of a second each) run the real CLI in a subprocess; those that need
transformers run through `main()` in this process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PROGRESS = re.compile(r"\d+%\||examples/s\]|^\s*$")  # tqdm progress bars (datasets, tokenising), blank lines
LONG_TEXT = "To be, or not to be, that is the question.\n" * 60

# (id, task, scenario changes or raw config text, extra CLI arguments, expected part of the error line)
# In strings, {files} is a folder of prepared data files and models (also ./files: the cases run
# in its parent folder), {base} the tiny base model.
# Rejected before torch or transformers are imported: each case runs `sat-train` in a subprocess.
BEFORE_IMPORTS = [
    # the YAML file itself
    ("yaml-tab", "cpt", "model: x\ndata:\n\ttrain: y\n", [], "bad.yaml:3:1: YAML syntax error"),
    ("yaml-bracket", "cpt", "model: x\ndata: {train: [a, b\n", [], "bad.yaml:3:1: YAML syntax error"),
    ("yaml-latin1", "cpt", "model: caf\xe9\n".encode("latin-1"), [], "bad.yaml:1: not UTF-8"),
    ("yaml-list", "cpt", "- model\n- data\n", [], "expected a mapping at top level, got list"),
    ("config-missing", "cpt", None, [], "config file not found"),
    ("unknown-section", "cpt", {"optimiser": "adam"}, [], "unknown top-level key 'optimiser'"),
    # --set
    ("set-no-equals", "cpt", {}, ["--set", "training.max_steps"], "expected key=value"),
    ("set-bad-yaml", "cpt", {}, ["--set", "training.max_steps=[1, 2"], "--set 'training.max_steps=[1, 2':1:6: YAML syntax error"),
    ("set-empty-key", "cpt", {}, ["--set", "training..max_steps=3"], "is not a dotted key"),
    ("set-into-value", "cpt", {}, ["--set", "model.name=x"], "'model' is not a section"),
    # model
    ("model-null", "cpt", {"model": None}, [], "key 'model' has invalid value None"),
    ("model-dot-missing", "cpt", {"model": "./no/such/model"}, [], "local model folder not found: no/such/model"),
    ("model-parent-missing", "cpt", {"model": "../no-such-model"}, [], "local model folder not found"),
    ("model-abs-missing", "cpt", {"model": "/no/such/model"}, [], "local model folder not found: /no/such/model"),
    ("model-home-missing", "cpt", {"model": "~/no-such-model-sat"}, [], "local model folder not found"),
    (
        "model-in-existing-folder",
        "cpt",
        {"model": "files/no-such-model"},
        [],
        "local model folder not found: files/no-such-model",
    ),
    ("model-hub-offline", "cpt", {"model": "no-such-org/no-such-model"}, [], "no-such-org/no-such-model cannot be loaded"),
    ("model-builtin-unknown", "cpt", {"model": "builtin:llama-70b"}, [], "allowed: builtin:base, builtin:smollm2-135m"),
    ("model-not-a-model", "cpt", {"model": "{files}/empty"}, [], "is not a model folder (no config.json)"),
    ("model-is-a-file", "cpt", {"model": "{files}/good.txt"}, [], "is not a model folder"),
    ("model-type-unsupported", "cpt", {"model": "{files}/bert"}, [], "model_type 'bert' of {files}/bert is not supported by SAT"),
    # data files and settings
    ("data-missing", "cpt", {"data": None}, [], "key 'data' has invalid value None"),
    ("data-path-missing", "cpt", {"data.train": "./no/such.jsonl"}, [], "data path not found: ./no/such.jsonl"),
    ("data-builtin-unknown", "cpt", {"data.train": "builtin:wikipedia"}, [], "unknown builtin dataset 'builtin:wikipedia'"),
    ("data-suffix", "cpt", {"data.train": "{files}/data.xml"}, [], "has suffix '.xml'"),
    ("data-empty-folder", "cpt", {"data.train": "{files}/empty"}, [], "holds neither a saved dataset nor .txt files"),
    ("data-txt-latin1", "cpt", {"data.train": "{files}/latin1.txt"}, [], "latin1.txt:2: not UTF-8"),
    ("data-jsonl-broken-line", "cpt", {"data.train": "{files}/broken.jsonl"}, [], "broken.jsonl:3:"),
    ("data-jsonl-not-object", "cpt", {"data.train": "{files}/list.jsonl"}, [], "list.jsonl:2: expected a JSON object"),
    ("data-jsonl-latin1", "cpt", {"data.train": "{files}/latin1.jsonl"}, [], "latin1.jsonl:2: not UTF-8"),
    ("data-json-broken", "cpt", {"data.train": "{files}/broken.json"}, [], "broken.json:2:"),
    ("cpt-record-without-text", "cpt", {"data.train": "{files}/chat.jsonl"}, [], "chat.jsonl:1: record has no text in 'text'"),
    ("cpt-csv-without-text", "cpt", {"data.train": "{files}/pairs.csv"}, [], "pairs.csv has no column 'text'"),
    ("cpt-eval-bad", "cpt", {"data.eval": {"held": "{files}/broken.jsonl"}}, [], "key 'data.eval.held'"),
    ("sft-records-without-fields", "sft", {"data.train": "{files}/text.jsonl"}, [], "text.jsonl:1: SFT record has keys ['text']"),
    ("sft-csv-without-columns", "sft", {"data.train": "{files}/text.csv"}, [], "SFT needs 'messages'"),
    ("sft-from-txt", "sft", {"data.train": "{files}/good.txt"}, [], "SFT needs 'messages'"),
    ("data-max-length", "cpt", {"data.max_length": "long"}, [], "key 'data.max_length' has invalid value 'long'"),
    ("data-max-length-nan", "cpt", {"data.max_length": float("nan")}, [], "key 'data.max_length' has invalid value nan"),
    (
        "data-max-train-samples-zero",
        "cpt",
        {"data.max_train_samples": 0},
        [],
        "'data.max_train_samples' has invalid value 0; allowed: null or an integer >= 1",
    ),
    ("data-max-eval-samples-negative", "cpt", {"data.max_eval_samples": -4}, [], "'data.max_eval_samples' has invalid value -4"),
    ("data-unknown-key", "cpt", {"data.shuffle": True}, [], "unknown key 'data.shuffle'"),
    # values that do not fit the model (read from its config.json, or a builtin's known shape)
    (
        "max-length-beyond-context",
        "cpt",
        {"data.max_length": 4096},
        [],
        "key 'data.max_length' has invalid value 4096; allowed: an integer from 8 to 1024 (the context of {base}, max_position_embeddings)",
    ),
    (
        "max-length-beyond-builtin-context",
        "sft",
        {"model": "builtin:smollm2-135m", "data.max_length": 10000},
        [],
        "allowed: an integer from 8 to 8192 (the context of builtin:smollm2-135m",
    ),
    (
        "dense-layers-beyond-model",
        "cpt",
        {"sat.dense_layers": [0, 2]},
        [],
        "key 'sat.dense_layers' has invalid value [0, 2]: {base} has 2 layers; allowed: indices in [-2, 1]",
    ),
    ("dense-layers-below-model", "cpt", {"sat.dense_layers": [-3]}, [], "has 2 layers; allowed: indices in [-2, 1]"),
    ("dense-layers-beyond-builtin", "cpt", {"model": "builtin:base", "sat.dense_layers": [6]}, [], "builtin:base has 6 layers"),
    ("dense-layers-all", "cpt", {"sat.dense_layers": [0, -1]}, [], "it names all 2 layers of {base}, so SAT would omit nothing"),
    # SAT, LoRA and run settings
    ("sat-rate", "cpt", {"sat.omission_rate": 1.5}, [], "'omission_rate' has invalid value 1.5"),
    ("sat-not-mapping", "cpt", {"sat": [0.5]}, [], "SAT config must be a mapping"),
    ("max-skipped", "cpt", {"max_skipped_steps": -1}, [], "key 'max_skipped_steps' has invalid value -1"),
    ("lora-not-mapping", "cpt", {"lora": "r=8"}, [], "key 'lora' has invalid value 'r=8'"),
]
# Rejected once transformers is imported (TrainingArguments, LoraConfig, the run folder, the
# tokenizer): the same checks, through `main()` in this process, so the suite does not pay the
# imports twenty times.
AFTER_IMPORTS = [
    # SAT, LoRA and run settings
    ("lora-unknown-key", "cpt", {"lora": {"rank": 8}}, [], "unknown key 'lora.rank'"),
    ("lora-dora", "cpt", {"lora": {"r": 8, "use_dora": True}}, [], "cannot slice DoRA"),
    ("lora-type", "cpt", {"lora": {"r": "eight"}}, [], "key 'lora.r' has invalid value 'eight'; allowed: an integer"),
    (
        "lora-targets",
        "cpt",
        {"lora": {"r": 4, "target_modules": ["query", "value"]}},
        [],
        "linear modules that exist: down_proj, gate_proj",
    ),
    (
        "lora-bias",
        "cpt",
        {"lora": {"r": 4, "target_modules": ["q_proj"], "bias": "weird"}},
        [],
        "key 'lora': Requested bias: weird",
    ),
    ("lora-rank-zero", "cpt", {"lora": {"r": 0}}, [], "key 'lora.r' has invalid value 0; allowed: an integer >= 1"),
    ("lora-alpha-negative", "cpt", {"lora": {"r": 4, "lora_alpha": -8}}, [], "key 'lora.lora_alpha' has invalid value -8"),
    (
        "lora-dropout-one",
        "cpt",
        {"lora": {"r": 4, "lora_dropout": 1.0}},
        [],
        "key 'lora.lora_dropout' has invalid value 1.0; allowed: a number in [0, 1)",
    ),
    # training arguments
    ("training-not-mapping", "cpt", {"training": [1]}, [], "key 'training' has invalid value [1]"),
    ("training-unknown-key", "cpt", {"training.learning_rat": 0.1}, [], "unknown key 'training.learning_rat'"),
    ("training-no-output-dir", "cpt", {"training.output_dir": None}, [], "key 'training.output_dir' is missing"),
    (
        "training-lr-string",
        "cpt",
        {},
        ["--set", "training.learning_rate=fast"],
        "key 'training.learning_rate' has invalid value 'fast'",
    ),
    ("training-steps-float", "cpt", {"training.max_steps": 2.5}, [], "key 'training.max_steps' has invalid value 2.5"),
    ("training-bool", "cpt", {"training.use_cpu": "maybe"}, [], "allowed: true or false"),
    ("training-scheduler", "cpt", {"training.lr_scheduler_type": "cosine_annealing"}, [], "allowed: linear, cosine,"),
    (
        "training-optim",
        "cpt",
        {"training.optim": "adam"},
        [],
        "key 'training.optim' has invalid value 'adam'; allowed: adamw_torch",
    ),
    # training arguments that are the right type but impossible (transformers, torch or numpy would fail later)
    (
        "training-batch-zero",
        "cpt",
        {"training.per_device_train_batch_size": 0},
        [],
        "key 'training.per_device_train_batch_size' has invalid value 0; allowed: an integer >= 1",
    ),
    (
        "training-accumulation-zero",
        "cpt",
        {"training.gradient_accumulation_steps": 0},
        [],
        "key 'training.gradient_accumulation_steps' has invalid value 0; allowed: an integer >= 1",
    ),
    (
        "training-lr-negative",
        "cpt",
        {"training.learning_rate": -1e-4},
        [],
        "key 'training.learning_rate' has invalid value -0.0001; allowed: a number >= 0",
    ),
    (
        "training-eval-batch-zero",
        "cpt",
        {"training.per_device_eval_batch_size": 0},
        [],
        "key 'training.per_device_eval_batch_size' has invalid value 0; allowed: an integer >= 1",
    ),
    (
        "training-seed-negative",
        "cpt",
        {"training.seed": -1},
        [],
        "key 'training.seed' has invalid value -1; allowed: an integer in [0, 4294967295]",
    ),
    ("training-seed-too-big", "cpt", {"training.seed": 2**32}, [], "key 'training.seed' has invalid value 4294967296"),
    (
        "training-max-steps-zero",
        "cpt",
        {"training.max_steps": 0},
        [],
        "key 'training.max_steps' has invalid value 0; allowed: -1 or an integer >= 1",
    ),
    (
        "training-beta-one",
        "cpt",
        {"training.adam_beta2": 1.0},
        [],
        "key 'training.adam_beta2' has invalid value 1.0; allowed: a number in [0, 1)",
    ),
    (
        "training-lr-infinite",
        "cpt",
        {"training.learning_rate": float("inf")},
        [],
        "key 'training.learning_rate' has invalid value inf",
    ),
    (
        "training-weight-decay-negative",
        "cpt",
        {"training.weight_decay": -0.1},
        [],
        "key 'training.weight_decay' has invalid value -0.1",
    ),
    (
        "training-save-steps-zero",
        "cpt",
        {"training.save_steps": 0},
        [],
        "key 'training.save_steps' has invalid value 0; allowed: a number > 0",
    ),
    (
        "training-workers-negative",
        "cpt",
        {"training.dataloader_num_workers": -2},
        [],
        "key 'training.dataloader_num_workers' has invalid value -2",
    ),
    (
        "training-eval-without-sets",
        "cpt",
        {"training.eval_strategy": "steps"},
        [],
        "key 'training.eval_strategy' has invalid value 'steps': data.eval names no held-out set",
    ),
    (
        "training-best-model",
        "cpt",
        {"training.load_best_model_at_end": True, "training.eval_strategy": "steps", "training.save_strategy": "no"},
        [],
        "key 'training': --load_best_model_at_end requires the save and eval strategy to match",
    ),
    # run folder and modes
    ("compare-without-sat", "cpt", {"sat": None}, ["--compare-dense"], "--compare-dense needs a 'sat:' section"),
    ("resume-nothing", "cpt", {}, ["--resume"], "nothing to resume"),
    ("resume-and-overwrite", "cpt", {}, ["--resume", "--overwrite"], "contradict each other"),
    (
        "resume-bad-checkpoint",
        "cpt",
        {"training.resume_from_checkpoint": "{files}/empty"},
        [],
        "key 'training.resume_from_checkpoint'",
    ),
    (
        "rerun-with-checkpoints",
        "cpt",
        {"training.output_dir": "{files}/old_run"},
        [],
        "add --resume to continue from checkpoint-2",
    ),
    # hub datasets that do not load (no such dataset here: no network)
    (
        "data-hub-missing",
        "cpt",
        {"data.train": "no-such-org/no-such-dataset"},
        [],
        "key 'data.train' (no-such-org/no-such-dataset): cannot be loaded from the hub: Couldn't reach 'no-such-org/no-such-dataset'",
    ),
    (
        "data-hub-eval-missing",
        "sft",
        {"data.eval": {"held": "no-such-org/chat@en:test"}},
        [],
        "key 'data.eval.held' (no-such-org/chat@en:test): cannot be loaded",
    ),
    # data that fails only once tokenised (needs the tokenizer)
    (
        "cpt-text-shorter-than-a-block",
        "cpt",
        {"data.train": "{files}/short.txt"},
        [],
        "fewer than one block of data.max_length=64",
    ),
    (
        "sft-all-truncated",
        "sft",
        {"data.train": "{files}/long_prompts.jsonl", "data.max_length": 8},
        [],
        "all 3 records lose their whole response",
    ),
]


def _scenario(task: str, base: Path, files: Path, out: Path, changes: dict) -> dict:
    """A valid tiny scenario (it would train), with ``changes`` applied (dotted keys: nested)."""
    raw = {
        "model": str(base),
        "data": {"train": str(files / ("good.txt" if task == "cpt" else "chat.jsonl")), "max_length": 64},
        "training": {"output_dir": str(out), "max_steps": 1, "use_cpu": True, "report_to": []},
        "sat": {"omission_rate": 0.5},
    }
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


def _fill(value, files: Path, base: Path):
    if isinstance(value, str):
        return value.replace("{files}", str(files)).replace("{base}", str(base))
    if isinstance(value, dict):
        return {k: _fill(v, files, base) for k, v in value.items()}
    return value


def _write_files(files: Path) -> None:
    (files / "empty").mkdir()
    (files / "bert").mkdir()
    (files / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (files / "good.txt").write_text(LONG_TEXT)
    (files / "short.txt").write_text("Too short.")
    (files / "latin1.txt").write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    (files / "data.xml").write_text("<text/>")
    (files / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    (files / "list.jsonl").write_text('{"text": "a"}\n["text", "b"]\n')
    (files / "latin1.jsonl").write_bytes('{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    (files / "broken.json").write_text('[\n  {"text": "a"},,\n]\n')
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    (files / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    (files / "text.jsonl").write_text('{"text": "no prompt, no response"}\n')
    (files / "pairs.csv").write_text("prompt,response\nHi,Hello.\n")
    (files / "text.csv").write_text("text\nsome text\n")
    long = {"prompt": "Tell me everything about the history plays of 1623. " * 4, "response": "No."}
    (files / "long_prompts.jsonl").write_text((json.dumps(long) + "\n") * 3)
    (files / "old_run" / "checkpoint-2").mkdir(parents=True)
    (files / "old_run" / "checkpoint-2" / "trainer_state.json").write_text("{}")


def _prepare(case, cases: Path, base: Path, files: Path) -> tuple[list[str], Path]:
    """The case's config file written; returns its `sat-train` arguments and its run folder."""
    name, task, config, extra, _ = case
    folder = cases / name
    folder.mkdir()
    out = folder / "out"
    path = folder / "bad.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    elif isinstance(config, str):
        path.write_text(config)
    elif isinstance(config, dict):
        path.write_text(yaml.safe_dump(_scenario(task, base, files, out, _fill(config, files, base))))
    return [task, "--config", str(path), *extra], out


def _assert_refused(case, code: int, stdout: str, stderr: str, out: Path, files: Path, base: Path) -> None:
    """Exit 2, one error line with the expected words, no traceback, few lines, no training step."""
    output = stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("sat-train: error:")]
    assert code == 2, output[-2000:]
    assert "Traceback" not in output and len(errors) == 1, output[-2000:]
    assert _fill(case[4], files, base) in errors[0]
    lines = [line for line in stderr.splitlines() if not PROGRESS.search(line)]
    assert len(lines) <= 3, stderr  # the error, and at most a warning or two (progress bars aside)
    assert not out.exists() and "'loss'" not in output  # no training step, no run folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_input") / "files"
    folder.mkdir()
    _write_files(folder)
    (folder.parent / "cases").mkdir()
    return folder


@pytest.fixture(scope="module")
def outcomes(tiny_base, files):
    """Every subprocess case run once, two at a time (the machine has two cores)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def run(case):
        argv, out = _prepare(case, files.parent / "cases", tiny_base, files)
        cmd = [sys.executable, "-m", "sat_trainer.app.cli", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=files.parent, timeout=300), out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((c[0] for c in BEFORE_IMPORTS), pool.map(run, BEFORE_IMPORTS)))


def test_cases_are_many_and_distinct():
    names = [c[0] for c in BEFORE_IMPORTS + AFTER_IMPORTS]
    assert len(BEFORE_IMPORTS) >= 40 and len(names) == len(set(names))


@pytest.mark.parametrize("case", BEFORE_IMPORTS, ids=[c[0] for c in BEFORE_IMPORTS])
def test_bad_input_in_a_subprocess(case, outcomes, files, tiny_base):
    proc, out = outcomes[case[0]]
    _assert_refused(case, proc.returncode, proc.stdout, proc.stderr, out, files, tiny_base)


@pytest.mark.parametrize("case", AFTER_IMPORTS, ids=[c[0] for c in AFTER_IMPORTS])
def test_bad_input_in_process(case, tiny_base, files, capsys, monkeypatch):
    import datasets

    from sat_trainer.app.cli import main

    monkeypatch.chdir(files.parent)
    # there is no network here: offline mode fails a hub load the same way (ConnectionError) in a second, not after 25 s of retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    argv, out = _prepare(case, files.parent / "cases", tiny_base, files)
    code = main(argv)  # an uncaught exception (a traceback) fails the test
    captured = capsys.readouterr()
    _assert_refused(case, code, captured.out, captured.err, out, files, tiny_base)


def test_rejected_before_torch_is_imported(tmp_path):
    """A bad config costs a fraction of a second: the CLI does not import torch to reject it."""
    (tmp_path / "bad.yaml").write_text("model: ./no/such/model\ndata: {train: x.txt}\ntraining: {output_dir: out}\n")
    code = (
        "import sys\nfrom sat_trainer.app.cli import main\n"
        f"assert main(['cpt', '--config', {str(tmp_path / 'bad.yaml')!r}]) == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
