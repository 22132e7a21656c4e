"""Read local data files once, cheaply, for what would otherwise fail deep inside ``datasets``.

Runs while the config is validated, before torch, transformers or datasets are imported: a
file that is not UTF-8 (its line), a ``.jsonl`` line that is not a JSON object (its line
number), a CPT record without the text field, an SFT record in neither record form, a CSV or
parquet table without the needed columns. Each is one :class:`SATError` line naming the file
and what to do. Big files are streamed line by line; parquet only has its schema read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import SATError
from ...yaml_io import read_utf8
from . import PACKED
from .records import NEEDED, has_sft_columns, to_messages


def check_local(path: Path, task: str, text_field: str) -> None:
    """Raise :class:`SATError` if the local file or folder at ``path`` cannot feed ``task``."""
    if path.is_dir():
        _check_folder(path, task, text_field)
    elif path.suffix == ".txt":
        read_utf8(path)
        _check_columns(path, ["text"], task, text_field)
    elif path.suffix == ".jsonl" or (path.suffix == ".json" and not _starts_with(path, b"[")):
        for line, record in _json_lines(path):
            _check_record(f"{path}:{line}", record, task, text_field)
    elif path.suffix == ".json":
        try:
            records = json.loads(read_utf8(path))
        except json.JSONDecodeError as err:
            raise SATError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
        for i, record in enumerate(records):
            _check_record(f"{path}: record {i}", record, task, text_field)
    elif path.suffix == ".csv":
        _check_columns(path, _csv_header(path), task, text_field)
    elif path.suffix == ".parquet":
        _check_columns(path, _parquet_columns(path), task, text_field)


def _check_folder(path: Path, task: str, text_field: str) -> None:
    info = path / "dataset_info.json"
    if info.is_file():  # a Dataset.save_to_disk folder: its columns are in the info
        _check_columns(path, list(json.loads(read_utf8(info)).get("features") or {}), task, text_field)
        return
    if (path / "state.json").is_file():
        return
    texts = sorted(path.glob("*.txt"))
    if not texts:
        raise SATError(f"data folder {path} holds neither a saved dataset nor .txt files")
    for text in texts:
        read_utf8(text)
    _check_columns(path, ["text"], task, text_field)


def _check_columns(where: Path, columns: list[str], task: str, text_field: str) -> None:
    if task in PACKED and text_field not in columns:
        raise SATError(f"{where} has no column {text_field!r} (data.text_field); its columns: {columns}; set data.text_field")
    if task == "sft" and not has_sft_columns(columns):
        raise SATError(f"{where} has columns {columns}; SFT needs {NEEDED}")


def _check_record(where: str, record: Any, task: str, text_field: str) -> None:
    if not isinstance(record, dict):
        raise SATError(f"{where}: expected a JSON object (one record), got {type(record).__name__}")
    if task in PACKED and not isinstance(record.get(text_field), str):
        raise SATError(f"{where}: record has no text in {text_field!r} (data.text_field); its keys: {sorted(record)}")
    if task == "sft":
        try:
            to_messages(record)
        except SATError as err:
            raise SATError(f"{where}: {err}") from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SATError(f"{path}:{number}: not UTF-8; save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                raise SATError(
                    f"{path}:{number}:{err.colno}: not valid JSON ({err.msg}); each line must be one JSON object"
                ) from None


def _csv_header(path: Path) -> list[str]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SATError(f"{path}:{number}: not UTF-8; save the file as UTF-8") from None
    with path.open(encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as err:  # pyarrow raises its own error types for a file that is not parquet
        raise SATError(f"{path} is not a readable parquet file: {str(err).splitlines()[0]}") from None


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(prefix)
