"""`sat-train pretrain`: pre-training from scratch as a scenario. The Python-source corpus on a fake site-packages tree
(dedup, the held-out split by path hash, the token cap, the cached blocks), the named shapes, step timing's
per-target (schedule est) rates, a tiny run end to end with and without --compare-dense, and bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from sat_trainer import SATConfig, SATError
from sat_trainer.app import step_timing
from sat_trainer.app.cli import main
from sat_trainer.app.data import python_source, token_blocks
from sat_trainer.app.data.tokenizer import train_tokenizer
from sat_trainer.app.pretrain import BASE_SHAPE
from sat_trainer.app.scratch import model_config
from sat_trainer.app.shapes import SHAPES
from sat_trainer.app.step_timing import StepTimes, rate_key, timed_rates

PACKAGE = Path(__file__).resolve().parents[1] / "sat_trainer"
STAGES = [
    {"fraction": 0.4, "layers": 0.5, "heads": 0.5, "channels": 0.5},
    {"fraction": 0.3, "heads": 0.5, "channels": 0.5},
    {"fraction": 0.3},
]
EST = SATConfig(
    targets=["mlp", "attention", "layers"],
    omit_in="forward_backward",
    metric="uniform",
    rescale="inverse_keep",
    schedule="est",
    dense_warmup_fraction=0.0,
    est_stages=STAGES,
)
WIDE = "attention=0.5,layers=0.5,mlp=0.5"  # stage 1's rates: half the layers, heads and channels
NARROW = "attention=0.5,layers=0,mlp=0.5"  # stage 2's: every layer at half width
EST_SETS = [  # EST's paper shape, as the scenario's comment gives it (the scenario ships SAT's paper form)
    "sat.schedule=est",
    "sat.metric=uniform",
    "sat.rescale=inverse_keep",
    "sat.targets=[mlp,attention,layers]",
    "sat.est_stages=[{fraction: 0.4, layers: 0.5, heads: 0.5, channels: 0.5}, {fraction: 0.3, heads: 0.5, channels: 0.5}, {fraction: 0.3}]",
]


def _fake_site(root: Path) -> dict[str, Path]:
    """Two packages: alpha holds sat_trainer's own source (real Python, ~100 files), an exact copy of one of its
    files, an empty file and a Latin-1 one; beta 200 small generated modules."""
    alpha = root / "alpha"
    shutil.copytree(PACKAGE, alpha, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(alpha / "config.py", alpha / "config_copy.py")
    (alpha / "empty.py").write_text("\n")
    (alpha / "latin.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    beta = root / "beta" / "sub"
    beta.mkdir(parents=True)
    for i in range(200):
        (beta / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")
    return {"alpha": root / "alpha", "beta": root / "beta"}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """The fake tree as builtin:python-source's packages, and a fresh cache folder."""
    roots = _fake_site(tmp_path / "site")
    monkeypatch.setattr(python_source, "package_dirs", lambda names=python_source.PACKAGES: roots)
    monkeypatch.setenv("SAT_TRAINER_CACHE", str(tmp_path / "cache"))
    return roots


def _rel_files(roots: dict[str, Path]) -> dict[str, bytes]:
    return {f"{n}/{p.relative_to(r).as_posix()}": p.read_bytes() for n, r in roots.items() for p in sorted(r.rglob("*.py"))}


# ---- the corpus ----------------------------------------------------------------------------------------------


def test_corpus_drops_duplicates_and_splits_by_the_hash_of_the_path(site, tmp_path, monkeypatch):
    monkeypatch.setattr(python_source, "HELD_OUT_PER_MILLE", 200)  # 20%: both splits well filled on a small tree
    train, held = python_source.build("train"), python_source.build("validation")
    every = _rel_files(site)
    first_of_content: dict[bytes, str] = {}
    for rel, data in sorted(every.items(), key=lambda item: (item[0].split("/")[0], item[0])):
        first_of_content.setdefault(data, rel)
    usable = {rel for data, rel in first_of_content.items() if data.strip() and rel != "alpha/latin.py"}
    in_held = {rel for rel in usable if int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 1000 < 200}
    assert {f.rel for f in held.files} == in_held and {f.rel for f in train.files} == usable - in_held
    assert 20 < len(in_held) < len(usable) / 2
    assert train.duplicates == held.duplicates == len(every) - len(first_of_content) == 1  # config_copy.py
    assert "alpha/config_copy.py" not in usable and train.skipped == 2  # the empty and the Latin-1 file
    order = [hashlib.sha256(f.rel.encode()).hexdigest() for f in train.files]
    assert order == sorted(order)  # a fixed shuffle across packages
    assert next(train.texts()) == train.files[0].path.read_text()
    # the same files elsewhere on disk: the same split and fingerprint; one changed byte: another fingerprint
    moved = _fake_site(tmp_path / "elsewhere")
    assert python_source.build("train", moved).fingerprint() == train.fingerprint()
    package, rel = train.files[5].rel.split("/", 1)
    (moved[package] / rel).write_text("changed = True\n")
    assert python_source.build("train", moved).fingerprint() != train.fingerprint()


def test_no_installed_package_is_one_line(monkeypatch):
    monkeypatch.setattr(python_source, "package_dirs", lambda names=python_source.PACKAGES: {})
    with pytest.raises(SATError, match="found none of its packages installed"):
        python_source.build("train")


def test_blocks_are_the_capped_token_stream_and_are_cached(site, tmp_path, monkeypatch):
    corpus = python_source.build("train")
    tokenizer = train_tokenizer(list(corpus.texts())[:20], vocab_size=400)
    cache = tmp_path / "cache"
    blocks = token_blocks.corpus_blocks("python-source", corpus, "train", tokenizer, 32, max_tokens=5000, cache_root=cache)
    stream = [
        t for text in corpus.texts() for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ]
    assert len(stream) > 20_000
    assert len(blocks) == 5000 // 32 and [t for b in blocks["input_ids"] for t in b] == stream[: len(blocks) * 32]
    assert blocks["labels"] == blocks["input_ids"]
    (folder,) = (cache / "corpus").iterdir()
    manifest = json.loads((folder / "blocks.json").read_text())
    assert manifest["tokens"] == 5000 and manifest["blocks"] == len(blocks) and manifest["duplicate_files_dropped"] == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(token_blocks, "_tokenize", no_tokenizing)
    again = token_blocks.corpus_blocks("python-source", corpus, "train", tokenizer, 32, max_tokens=5000, cache_root=cache)
    assert again["input_ids"] == blocks["input_ids"]
    with pytest.raises(AssertionError, match="tokenised again"):  # another cap is another set
        token_blocks.corpus_blocks("python-source", corpus, "train", tokenizer, 32, max_tokens=6000, cache_root=cache)


def test_a_cap_beyond_the_corpus_is_refused(site, tmp_path):
    corpus = python_source.build("validation")
    tokenizer = train_tokenizer(list(corpus.texts()), vocab_size=300)
    with pytest.raises(SATError, match=r"fewer than data.max_train_tokens=10,000,000; lower data.max_train_tokens"):
        token_blocks.corpus_blocks("python-source", corpus, "validation", tokenizer, 32, max_tokens=10**7, cache_root=tmp_path)
    assert not (tmp_path / "corpus").exists() or not any((tmp_path / "corpus").iterdir())  # nothing half-written kept


# ---- shapes --------------------------------------------------------------------------------------------------


class _Vocab:
    """What model_config reads of a tokenizer: its size and special tokens."""

    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __len__(self):
        return 8192


@pytest.mark.parametrize("name", list(SHAPES))
def test_named_shapes_have_the_size_their_name_says(name):
    architecture, fields = SHAPES[name]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config(architecture, fields, _Vocab(), 256))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert model.config.model_type == architecture
    assert abs(millions / int(name.split("-")[1][:-1]) - 1) < 0.12, millions


def test_pretrain_base_is_the_llama_6m_shape():
    assert BASE_SHAPE == SHAPES["llama-6m"][1] and BASE_SHAPE["intermediate_size"] == 704


# ---- step timing under schedule est ---------------------------------------------------------------------------


def test_timed_rates_are_each_est_stage_and_the_curve_is_retimed_stage_by_stage():
    assert [step_timing.key_rates(k) for k in timed_rates(EST, 10)] == [
        0.0,
        {"attention": 0.5, "layers": 0.0, "mlp": 0.5},
        {"attention": 0.5, "layers": 0.5, "mlp": 0.5},
    ]
    assert rate_key({"mlp": 0.0, "attention": 0.0, "layers": 0.0}) == 0.0  # the last stage is dense's
    times = StepTimes(
        dense_s=1.0,
        sat_s={0.0: 1.0, WIDE: 0.4, NARROW: 0.7},
        kept_flops={0.0: 1.0, WIDE: 0.3, NARROW: 0.55},
        rounds=3,
    )
    # 10 steps: progress s / 9; stage 1 below 0.4 (steps 0-3), stage 2 below 0.7 (4-6), dense from 0.7 (7-9)
    assert times.curve_time(EST, 10, 4) == pytest.approx(4 * 0.4)
    assert times.curve_time(EST, 10, 6) == pytest.approx(4 * 0.4 + 2 * 0.7)
    assert times.schedule_time(EST, 10) == pytest.approx(4 * 0.4 + 3 * 0.7 + 3 * 1.0)
    assert times.schedule_ideal(EST, 10) == pytest.approx(10 / (4 * 0.3 + 3 * 0.55 + 3 * 1.0))
    steps = times.equal_time_steps(EST, 10)
    assert times.schedule_time(EST, steps) <= 10.0 < times.schedule_time(EST, steps + 1)
    assert StepTimes.from_dict(json.loads(json.dumps(times.to_dict()))) == times
    untimed = StepTimes(dense_s=1.0, sat_s={0.0: 1.0, WIDE: 0.4}, rounds=1)
    with pytest.raises(SATError, match=f"no step time measured at the stage rates {NARROW}"):
        untimed.schedule_time(EST, 10)


def test_measure_times_each_est_stage_on_a_real_model():
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
        )
    )
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    ids = torch.randint(0, 64, (2, 16))
    times = step_timing.measure(model, {"input_ids": ids, "labels": ids}, args, EST, timed_rates(EST, 10), rounds=2)
    assert set(times.samples) == {"dense", f"sat@{WIDE}", f"sat@{NARROW}"}
    assert set(times.sat_s) == {0.0, WIDE, NARROW} and all(t > 0 for t in times.sat_s.values())
    # the FLOP fraction each stage keeps: half the layers at half width keep less than every layer at half width
    assert times.kept_flops[0.0] == 1.0 > times.kept_flops[NARROW] > times.kept_flops[WIDE] > 0


# ---- end to end ----------------------------------------------------------------------------------------------

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=300",
    "data.max_length=32",
    "data.max_train_tokens=20000",
    "data.max_eval_samples=4",
    "data.curve_eval_samples=2",
    "training.max_steps=4",
    "training.eval_steps=2",
    "training.logging_steps=1",
    "training.per_device_train_batch_size=2",
    "training.per_device_eval_batch_size=4",
]


def _args(out: Path, *extra: str) -> list[str]:
    return [item for key in [*TINY, f"training.output_dir={out}", *extra] for item in ("--set", key)]


@pytest.mark.slow
def test_pretrain_from_scratch_end_to_end(site, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/pretrain_llama_python.yaml", *_args(out, "sat=null")]) == 0
    printed = capsys.readouterr().out
    assert "builtin:python-source train: 20,000 tokens (the first 20,000: data.max_train_tokens)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dense" and report["steps"] == 4 and report["tokens"] == 4 * 2 * 32
    assert [e["step"] for e in report["history"]["held_out"]] == [0, 2, 4] and set(report["held_out_loss"]) == {"python"}
    init = Path(report["config"]["model_path"])
    assert init.parent.name == "scratch" and json.loads((init / "scratch_info.json").read_text())["shape"] == "llama-10m"
    final = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert (final.config.hidden_size, final.config.num_hidden_layers, final.config.vocab_size) == (32, 2, 300)
    start = transformers.AutoModelForCausalLM.from_pretrained(init)
    assert any(not a.equal(b) for a, b in zip(start.parameters(), final.parameters()))  # it trained from the init
    # a second run reuses the tokenizer, the initial model and the token blocks: nothing trained or tokenised again
    assert main(["pretrain", "--config", "configs/pretrain_llama_python.yaml", *_args(tmp_path / "again", "sat=null")]) == 0
    printed = capsys.readouterr().out
    assert "reused from" in printed and "trained a" not in printed and "initialised" not in printed
    assert json.loads((tmp_path / "again" / "report.json").read_text())["config"]["model_path"] == str(init)


@pytest.mark.slow
def test_compare_dense_with_schedule_est_retimes_stage_by_stage(site, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["pretrain", "--config", "configs/pretrain_llama_python.yaml", "--compare-dense", "--timing-rounds", "2"]
    assert main([*argv, *_args(out, *EST_SETS)]) == 0
    table = capsys.readouterr().out
    assert "| | dense | SAT, equal steps | SAT, equal time (" in table and "held-out loss: python" in table
    dense, sat = (json.loads((out / name / "report.json").read_text()) for name in ("dense", "sat"))
    assert dense["config"]["model_path"] == sat["config"]["model_path"]  # the same initial weights
    assert sat["omission_schedule"] == [0.5, 0.5, 0.5, 0.0]  # stage 1 (steps 0-1), stage 2 (step 2), dense (step 3)
    times = StepTimes.from_dict(json.loads((out / "step_times.json").read_text()))
    assert set(times.sat_s) == {0.0, WIDE, NARROW}
    compare = json.loads((out / "compare.json").read_text())
    row = compare["runs"][1]
    assert row["train_step_time_s"] == pytest.approx(2 * times.sat_s[WIDE] + times.sat_s[NARROW] + times.dense_s)
    assert row["flop_ideal"] == pytest.approx(4 / (2 * times.kept_flops[WIDE] + times.kept_flops[NARROW] + 1.0))
    timed = json.loads((out / "sat_equal_time" / "report.json").read_text())
    assert timed["steps"] == times.equal_time_steps(SATConfig.from_dict(sat["config"]["sat"]), 4)


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (["model.shape=llama-99m"], "key 'model.shape' has invalid value 'llama-99m'; allowed: llama-6m, llama-10m"),
        (
            ["model.hidden_size=100"],
            "key 'model.hidden_size' has invalid value 100; allowed: a multiple of num_attention_heads=8",
        ),
        (["model.num_hidden_layers=0"], "key 'model.num_hidden_layers' has invalid value 0; allowed: an integer"),
        (["model.num_key_value_heads=3"], "key 'model.num_key_value_heads' has invalid value 3; allowed: a divisor of"),
        (["model.n_layer=4"], "unknown key 'model.n_layer' for shape llama-10m (llama); allowed: shape, vocab_size"),
        (["model.vocab_size=100"], "key 'model.vocab_size' has invalid value 100"),
        (["model=builtin:base"], "key 'model' has invalid value 'builtin:base'; allowed (sat-train pretrain): a mapping"),
        (["data.max_train_tokens=0"], "key 'data.max_train_tokens' has invalid value 0"),
    ],
)
def test_bad_shapes_fail_before_anything_loads(override, message, tmp_path, capsys):
    argv = ["pretrain", "--config", "configs/pretrain_llama_python.yaml", "--set", f"training.output_dir={tmp_path / 'r'}"]
    assert main([*argv, *(x for o in override for x in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_python_source_is_refused_for_sft(tmp_path, capsys):
    argv = ["sft", "--config", "configs/demo_sft.yaml", "--set", "data.train=builtin:python-source"]
    assert main(argv) == 2
    assert (
        "builtin:python-source is a pre-training corpus (raw text); allowed for cpt and pretrain, not sft"
        in capsys.readouterr().err
    )


def test_a_corpus_smaller_than_the_requested_tokens_is_one_line(site, tmp_path, capsys):
    argv = ["pretrain", "--config", "configs/pretrain_llama_python.yaml"]
    assert main([*argv, *_args(tmp_path / "r", "data.max_train_tokens=50000000")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "key 'data.train' (builtin:python-source): the corpus holds" in err
        and "fewer than data.max_train_tokens=50,000,000" in err
    )
