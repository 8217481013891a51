"""SFT records → token ids and a per-token loss mask.

A record is one JSONL line of one of three shapes (see ``record_kind``):

- ``{"text": ...}``: plain text; every token is a target (pretraining).
- ``{"prompt": ..., "completion": ...}``: ``prompt`` then ``completion`` then EOS, tokenized separately and
  concatenated (no chat template: this is the completion format; write ``messages`` for a chat). Targets: the
  completion and the EOS.
- ``{"messages": [{"role", "content"}, ...]}`` with roles system/user/assistant: rendered by the chat template
  (``resolve_chat_template``) with transformers' own jinja machinery; targets: the assistant turns.

The assistant mask is found on the rendered text, then mapped onto the tokens of the whole rendering (so the ids
are exactly those of ``tokenizer.apply_chat_template(messages, tokenize=True)``):

- a template with ``{% generation %}`` blocks marks the assistant spans itself (what ``return_assistant_tokens_mask``
  reads);
- otherwise each assistant turn i spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the
  end of ``render(messages[:i+1])``, which requires the template to render prefixes of a conversation as prefixes
  of its rendering (checked; a template that does not is one line naming the record).

A token is a target when its character span overlaps an assistant span (the rule transformers uses).
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from megatrain.errors import DataError

ROLES = ("system", "user", "assistant")
KINDS = ("text", "prompt_completion", "messages")

# The template for tokenizers without one (megatrain's trained sentencepiece models): role headers in plain text,
# each assistant turn closed by the EOS token, so a sampler that stops at EOS stops at the end of the turn.
BUILTIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def record_kind(obj, origin: str) -> str:
    """The shape of one parsed JSONL line, checked (types, roles); one line naming ``origin`` when it is none."""
    if not isinstance(obj, dict):
        raise DataError(f"{origin}: a line must be a JSON object, got {type(obj).__name__}; write "
                        "{\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}")
    keys = [k for k in ("text", "prompt", "completion", "messages") if k in obj]
    if keys == ["text"]:
        _check_str(obj, "text", origin)
        return "text"
    if keys == ["prompt", "completion"]:
        _check_str(obj, "prompt", origin)
        _check_str(obj, "completion", origin)
        return "prompt_completion"
    if keys == ["messages"]:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{origin}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{origin}: messages[{j}] must be {{\"role\": one of {'/'.join(ROLES)}, "
                                f"\"content\": a string}}, got {str(m)[:80]}")
        return "messages"
    found = sorted(obj)[:8]
    if not keys:
        raise DataError(f"{origin}: no 'text', 'prompt'/'completion' or 'messages' field (found {found}); each line "
                        "needs {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}")
    raise DataError(f"{origin}: fields {keys} do not make one record shape; use exactly one of 'text', "
                    "'prompt'+'completion' or 'messages' per line")


def _check_str(obj: dict, key: str, origin: str) -> None:
    if not isinstance(obj[key], str):
        raise DataError(f"{origin}: '{key}' is {type(obj[key]).__name__}, expected a string")


def chat_template_id(value: str | None) -> str | None:
    """What the configured ``data.chat_template`` contributes to the prepared-data hash (a file by its contents)."""
    if value is None or value == "builtin":
        return value
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f"file:{os.path.abspath(path)}:{hashlib.sha256(f.read()).hexdigest()[:16]}"
    return f"string:{hashlib.sha256(value.encode()).hexdigest()[:16]}"


def resolve_chat_template(value: str | None, tokenizer=None, *, field: str = "data.chat_template") -> tuple[str, str]:
    """(template text, where it came from) for ``data.chat_template``: None = the tokenizer's own template when
    it has one, else the built-in one; ``builtin``; a path to a ``.jinja`` file; or a jinja template string."""
    if value is None:
        own = getattr(tokenizer, "chat_template", None)
        return (own, "tokenizer") if own else (BUILTIN_CHAT_TEMPLATE, "builtin")
    if value == "builtin":
        return BUILTIN_CHAT_TEMPLATE, "builtin"
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), f"file:{os.path.abspath(path)}"
    if "{{" in value or "{%" in value:
        return value, "string"
    raise DataError(f"{field}={value!r}: not 'builtin', an existing .jinja file or a jinja template "
                    "string; fix the path or leave it unset (the tokenizer's own template, else the built-in one)")


def render_chat(messages: list[dict], template: str, special_tokens: dict[str, str], *,
                add_generation_prompt: bool = False, generation_spans: bool = False, origin: str = "a conversation"):
    """The rendered text (and with ``generation_spans`` the ``{% generation %}`` character spans), by transformers'
    ``render_jinja_template`` - the sandboxed environment ``apply_chat_template`` renders with."""
    from transformers.utils.chat_template_utils import render_jinja_template
    import jinja2
    try:
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=generation_spans, **special_tokens)
    except (jinja2.exceptions.TemplateError, TypeError, ValueError) as err:
        raise DataError(f"{origin}: chat template failed to render ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160] if str(err) else ''}); fix data.chat_template") from None
    return (texts[0], spans[0]) if generation_spans else texts[0]


class RecordEncoder:
    """``encode(record, origin) -> (ids (n,) int64, mask (n,) uint8)``; every document ends with EOS."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tok = tokenizer
        self.template = chat_template
        self.specials = tokenizer.special_tokens_map() if chat_template is not None else {}
        self.has_generation = bool(chat_template and _GENERATION_TAG.search(chat_template))

    def encode(self, record, origin: str = "record") -> tuple[np.ndarray, np.ndarray]:
        if isinstance(record, str):
            record = {"text": record}
        kind = record_kind(record, origin)
        eos = self.tok.eos_id
        if kind == "text":
            ids = self.tok.encode(record["text"]) + [eos]
            return np.asarray(ids, np.int64), np.ones(len(ids), np.uint8)
        if kind == "prompt_completion":
            before, after = self.tok.around
            prompt = before + self.tok.encode_plain(record["prompt"])
            target = self.tok.encode_plain(record["completion"]) + after + [eos]
            return (np.asarray(prompt + target, np.int64),
                    np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(target), np.uint8)]))
        return self.encode_messages(record["messages"], origin)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, origin: str = "a conversation") -> str:
        if self.template is None:
            raise DataError(f"{origin}: chat data needs a chat template; set data.chat_template (e.g. 'builtin')")
        return render_chat(messages, self.template, self.specials, add_generation_prompt=add_generation_prompt,
                           origin=origin)

    def assistant_spans(self, messages: list[dict], origin: str = "record", *,
                        use_generation: bool | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, character spans of the assistant turns) - see the module doc for the two methods."""
        if self.has_generation if use_generation is None else use_generation:
            return render_chat(messages, self.template, self.specials, generation_spans=True, origin=origin)
        full = self.render(messages, origin=origin)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True, origin=origin) if i else ""
            through = self.render(messages[: i + 1], origin=origin)
            if not (through.startswith(start) and full.startswith(through)):
                raise DataError(f"{origin}: the chat template does not render the conversation's prefixes as "
                                f"prefixes of it (turn {i}), so assistant tokens cannot be located; use a template "
                                "with {% generation %} blocks (data.chat_template)")
            spans.append((len(start), len(through)))
        return full, spans

    def encode_messages(self, messages: list[dict], origin: str = "record") -> tuple[np.ndarray, np.ndarray]:
        text, spans = self.assistant_spans(messages, origin)
        ids, offsets = self.tok.encode_with_offsets(text)
        mask = np.zeros(len(ids), np.uint8)
        starts = np.asarray([o[0] for o in offsets], np.int64)
        ends = np.asarray([o[1] for o in offsets], np.int64)
        for a, b in spans:
            mask[(ends > a) & (starts < b)] = 1
        # documents end with EOS (a target when an assistant spoke last), unless the template already closed the
        # conversation with it, maybe followed by whitespace (ChatML's "<|im_end|>\n" when EOS is <|im_end|>)
        last = next((j for j in range(len(ids) - 1, -1, -1) if text[offsets[j][0]:offsets[j][1]].strip()
                     or ids[j] == self.tok.eos_id), None)
        if last is None or ids[last] != self.tok.eos_id:
            ids.append(self.tok.eos_id)
            mask = np.append(mask, np.uint8(messages[-1]["role"] == "assistant"))
        return np.asarray(ids, np.int64), mask


def load_chat_template(data_dir: str) -> str | None:
    """The template a prepared data dir's chat records were rendered with (``chat_template.jinja``), or None."""
    from megatrain.data.prepared import read_meta
    info = read_meta(data_dir).get("chat_template")
    if not isinstance(info, dict) or not isinstance(info.get("path"), str):
        return None
    with open(os.path.join(data_dir, os.path.basename(info["path"])), encoding="utf-8") as f:
        return f.read()


def encode_chat_prompt(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """Ids of ``messages`` followed by the template's generation prompt: what a model trained on this data is given
    to answer (rendered and tokenized exactly as prepare did)."""
    text = render_chat(messages, template, tokenizer.special_tokens_map(), add_generation_prompt=True)
    return tokenizer.encode_with_offsets(text)[0]


def record_text(record, template: str | None, specials: dict[str, str], origin: str = "a conversation") -> str:
    """The text a record contributes to tokenizer training (its rendering, special-token strings left out)."""
    if isinstance(record, str):
        return record
    if "text" in record:
        return record["text"]
    if "prompt" in record:
        return record["prompt"] + record["completion"]
    blank = {k: "" for k in specials}
    return render_chat(record["messages"], template, blank, origin=origin)
