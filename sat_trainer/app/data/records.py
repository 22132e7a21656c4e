"""The two SFT record forms, as chat messages; kept free of heavy imports so a config's data
files can be checked record by record before torch or datasets load.

Records may be chat-style (``messages``: a list of ``{"role", "content"}``) or pairs
(``instruction``/``prompt``/``question`` [+ ``input``/``context``] and ``response``/``output``/
``completion``/``answer``).
"""

from __future__ import annotations

from typing import Any

from ...errors import SATError

PROMPT_KEYS = ("instruction", "prompt", "question")
CONTEXT_KEYS = ("input", "context")
RESPONSE_KEYS = ("response", "output", "completion", "answer")
NEEDED = f"'messages' (a list of {{role, content}}), or one of {PROMPT_KEYS} with one of {RESPONSE_KEYS}"


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record as chat messages; raises :class:`SATError` naming the keys it found if it is neither form."""
    if isinstance(record.get("messages"), list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in record["messages"]):
            raise SATError(f"SFT record's 'messages' must be a list of {{role, content}} objects, got {record['messages']!r:.80}")
        return [{"role": m["role"], "content": str(m["content"])} for m in record["messages"]]
    prompt = next((record[k] for k in PROMPT_KEYS if record.get(k)), None)
    response = next((record[k] for k in RESPONSE_KEYS if record.get(k) is not None), None)
    if prompt is None or response is None:
        raise SATError(f"SFT record has keys {sorted(record)}; expected {NEEDED}")
    context = next((record[k] for k in CONTEXT_KEYS if record.get(k)), None)
    messages = [{"role": "system", "content": str(record["system"])}] if record.get("system") else []
    user = f"{prompt}\n\n{context}" if context else str(prompt)
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": str(response)}]


def has_sft_columns(columns: list[str]) -> bool:
    """Whether a table with these columns can hold SFT records (for CSV/parquet headers)."""
    return "messages" in columns or (any(k in columns for k in PROMPT_KEYS) and any(k in columns for k in RESPONSE_KEYS))
