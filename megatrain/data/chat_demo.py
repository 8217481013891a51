"""The chat JSONL megatrain ships (``data.sources: [chat_demo]``): short conversations built from templates.

``python -m megatrain.data.chat_demo`` writes megatrain/data/corpora/chat_demo.jsonl again; the output depends only
on the seed below (tests/unit/test_sft_demo.py checks the shipped file equals it). Tasks whose answers are
computed, so a model can learn them: arithmetic, reversing and spelling words, sorting and counting, upper case,
comparing numbers, and two-turn follow-ups; some conversations open with a system message.
"""
from __future__ import annotations

import json
import os
import random

SEED = 20240601
NUM_CONVERSATIONS = 400

# Words for the word tasks: names from the Python standard library and plain English.
WORDS = ("python", "module", "thread", "socket", "string", "parser", "buffer", "stream", "record", "number",
         "letter", "window", "garden", "silver", "planet", "river", "forest", "bridge", "candle", "castle",
         "orange", "yellow", "purple", "marble", "rocket", "engine", "signal", "vector", "matrix", "kernel",
         "tensor", "layer", "token", "batch", "shard", "queue", "stack", "graph", "float", "tuple")
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a careful assistant that shows its work.")


def _arithmetic(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    ask = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
    return [{"role": "user", "content": ask.format(a=a, op=op, b=b)},
            {"role": "assistant", "content": f"{a} {op} {b} = {value}."}]


def _reverse(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    return [{"role": "user", "content": f"Reverse the word '{word}'."},
            {"role": "assistant", "content": f"'{word}' reversed is '{word[::-1]}'."}]


def _spell(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    return [{"role": "user", "content": f"Spell '{word}' letter by letter."},
            {"role": "assistant", "content": "-".join(word.upper())}]


def _sort(rng: random.Random) -> list[dict]:
    values = rng.sample(range(1, 100), rng.randint(3, 6))
    return [{"role": "user", "content": "Sort these numbers: " + ", ".join(map(str, values)) + "."},
            {"role": "assistant", "content": ", ".join(map(str, sorted(values)))}]


def _count(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return [{"role": "user", "content": f"How many times does '{letter}' appear in '{word}'?"},
            {"role": "assistant", "content": f"'{letter}' appears {n} time{'s' if n != 1 else ''} in '{word}'."}]


def _upper(rng: random.Random) -> list[dict]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    text = " ".join(words)
    return [{"role": "user", "content": f"Write in upper case: {text}"},
            {"role": "assistant", "content": text.upper()}]


def _compare(rng: random.Random) -> list[dict]:
    a, b = rng.sample(range(1, 1000), 2)
    return [{"role": "user", "content": f"Which is larger, {a} or {b}?"},
            {"role": "assistant", "content": f"{max(a, b)} is larger than {min(a, b)}."}]


def _follow_up(rng: random.Random) -> list[dict]:
    a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            {"role": "user", "content": f"And that times {c}?"},
            {"role": "assistant", "content": f"{a + b} * {c} = {(a + b) * c}."}]


TASKS = (_arithmetic, _reverse, _spell, _sort, _count, _upper, _compare, _follow_up)


def conversations(n: int = NUM_CONVERSATIONS, seed: int = SEED) -> list[dict]:
    """``n`` distinct ``{"messages": [...]}`` records, the same for a given seed on every machine."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        messages = TASKS[len(out) % len(TASKS)](rng)
        if rng.random() < 0.25:
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] + messages
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:  # prepare drops exact duplicates; ship none
            seen.add(key)
            out.append({"messages": messages})
    return out


def render_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    from megatrain.data.sources import chat_demo_path
    from megatrain.fsutil import atomic_write_text
    path = chat_demo_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, render_jsonl(conversations()))
    print(f"wrote {path} ({NUM_CONVERSATIONS} conversations)")


if __name__ == "__main__":
    main()
