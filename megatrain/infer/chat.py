"""Prompts for generation: plain text or OpenAI-style ``messages`` rendered with a chat template.

The template (:func:`chat_template_of`), first found wins: ``--chat_template``; the one the model's own
training data was rendered with (a checkpoint whose prepared ``data.path`` holds chat records keeps it as
``chat_template.jinja``); the tokenizer's own; for megatrain's sentencepiece tokenizers the built-in one that
prepare uses for them (docs/data.md). A Hugging Face tokenizer without a template refuses messages in one line.
Messages are rendered and tokenized exactly as prepare renders training conversations
(``megatrain.data.chat.encode_chat_prompt``; for HF tokenizers that equals ``apply_chat_template``).
"""
from __future__ import annotations

import json
import os

from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError


def chat_template_of(tokenizer: Tokenizer, *, data_dir: str | None = None, override: str | None = None) -> str | None:
    """The chat template messages are rendered with for this model, or None when there is none (rule above)."""
    from megatrain.data.chat import load_chat_template, resolve_chat_template
    if override is not None:
        return resolve_chat_template(override, tokenizer, field="--chat_template")[0]
    if data_dir and os.path.isfile(os.path.join(data_dir, "meta.json")):
        trained = load_chat_template(data_dir)
        if trained:
            return trained
    own = getattr(tokenizer, "chat_template", None)  # HF tokenizers only
    if own:
        return own
    return resolve_chat_template("builtin")[0] if tokenizer.kind == "sentencepiece" else None


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return messages


def encode_prompt(tokenizer: Tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                  *, template: str | None = None, where: str = "prompt") -> list[int]:
    """Token ids to continue: ``prompt`` as the tokenizer's ``encode`` gives it (its BOS, no EOS), or ``messages``
    rendered with ``template`` (from :func:`chat_template_of`) followed by the assistant turn's opening."""
    if messages is None:
        return tokenizer.encode(prompt)
    if template is None:
        raise DataError(f"{where}: 'messages' need a chat template, and tokenizer {tokenizer.path} has none; "
                        "give a 'prompt' string, pass --chat_template, or use a tokenizer with a chat template")
    from megatrain.data.chat import encode_chat_prompt
    return encode_chat_prompt(tokenizer, template, check_messages(messages, where))


def read_prompts_jsonl(path: str) -> list[dict]:
    """``[{"prompt": str} | {"messages": [...]}, ...]`` from a JSONL file (other fields are kept, blank lines
    skipped); one line naming the file and line for anything else."""
    if not os.path.isfile(path):
        raise DataError(f"--prompts={path}: no such file; pass a JSONL file of {{\"prompt\"}} or {{\"messages\"}}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"--prompts={path} line {n}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or "messages" in row):
                raise DataError(f"--prompts={path} line {n}: needs a \"prompt\" string or a \"messages\" list")
            if "messages" in row:
                check_messages(row["messages"], f"--prompts={path} line {n}")
            rows.append(row)
    if not rows:
        raise DataError(f"--prompts={path}: no prompts in it")
    return rows
