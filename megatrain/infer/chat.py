"""Prompts for generation: plain text or OpenAI-style ``messages`` rendered with the tokenizer's chat template.

A Hugging Face tokenizer renders messages with its own ``apply_chat_template(..., add_generation_prompt=True)``.
megatrain's sentencepiece tokenizers carry no template of their own; :func:`chat_template_of` is the one place
a built-in template plugs in — until one is there, messages for such a tokenizer are refused in one line.
"""
from __future__ import annotations

import json
import os

from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError


def chat_template_of(tokenizer: Tokenizer):
    """A callable ``messages -> prompt text`` (ending with the assistant's turn opened), or None when the
    tokenizer has no chat template."""
    tok = getattr(tokenizer, "tok", None)  # the transformers tokenizer of an HFTokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        return lambda messages: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return None


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return messages


def encode_prompt(tokenizer: Tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                  *, where: str = "prompt") -> list[int]:
    """Token ids to continue: ``prompt`` as the tokenizer's ``encode`` gives it (its BOS, no EOS), or the
    chat-template rendering of ``messages`` (the template writes its own special tokens)."""
    if messages is None:
        return tokenizer.encode(prompt)
    render = chat_template_of(tokenizer)
    if render is None:
        raise DataError(f"{where}: 'messages' need a chat template, and tokenizer {tokenizer.path} has none; "
                        "give a 'prompt' string instead, or use a tokenizer with a chat template")
    text = render(check_messages(messages, where))
    return tokenizer.tok.encode(text, add_special_tokens=False)


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
