"""Prompt files: MT-Bench style (``turns``, ``category``) or plain ``{"prompt": ...}`` JSONL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text (the first turn for multi-turn records) and its category."""

    text: str
    category: str = "all"
    id: str = ""


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file.

    Each line is an object with ``prompt`` (or ``turns``, of which the first is used, or
    ``text``) and optionally ``category`` and an id (``id`` / ``question_id``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not JSON or has no prompt field (names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts: list[Prompt] = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            text = _text(record)
            if text is None:
                raise ValueError(f"{path}:{number}: no 'prompt', 'turns' or 'text' field")
            ident = str(record.get("id", record.get("question_id", number)))
            prompts.append(Prompt(text, str(record.get("category", "all")), ident))
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def balanced_subset(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """At most ``limit`` prompts taken round-robin over categories, each in file order.

    With one category this is the first ``limit`` prompts; with MT-Bench's eight, 40 prompts
    are the first five of each category (so a short benchmark still covers all of them).
    The result keeps the file's order.
    """
    if limit is None or limit >= len(prompts):
        return list(prompts)
    by_category: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_category.setdefault(prompt.category, []).append(i)
    chosen: list[int] = []
    rank = 0
    while len(chosen) < limit:
        for members in by_category.values():
            if rank < len(members) and len(chosen) < limit:
                chosen.append(members[rank])
        rank += 1
    return [prompts[i] for i in sorted(chosen)]


def _text(record: dict) -> str | None:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    if isinstance(record.get("text"), str):
        return record["text"]
    return None


def chat_tokens(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of ``text`` as a single user turn (chat template applied when available)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids)
    return list(tokenizer.encode(text))
