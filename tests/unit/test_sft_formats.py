"""The three JSONL shapes through prepare (trained sentencepiece + built-in template), one-line errors for bad lines,
and the chat JSONL megatrain ships."""
import json

import numpy as np
import pytest

from megatrain.config import DataConfig
from megatrain.data.chat import RecordEncoder, resolve_chat_template
from megatrain.data.indexed import ShardReader
from megatrain.data.prepare import prepare_corpus
from megatrain.data.tokenizer import load_tokenizer
from megatrain.errors import DataError

PC = [{"prompt": f"Q: what is {i} + {i}?\nA: ", "completion": f"{2 * i}"} for i in range(12)]
MSGS = [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in ("python", "module", "thread", "socket", "string", "parser", "buffer", "stream")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path, sources, **kw):
    kw = {"vocab_size": 400, "num_workers": 1, "val_fraction": 0.0, **kw}
    cfg = DataConfig(sources=sources, path=str(tmp_path / "out"), **kw)
    return prepare_corpus(cfg), str(tmp_path / "out")


def _documents(path):
    r = ShardReader(f"{path}/train-00000")
    return [(r.document(i).tolist(), None if r.mask is None else r.mask[r.offsets[i]:r.offsets[i + 1]].tolist())
            for i in range(r.num_docs)]


def test_text_jsonl_has_no_mask(tmp_path):
    meta, path = _prepare(tmp_path, [_jsonl(tmp_path / "t.jsonl", [{"text": f"document number {i} " * 4}
                                                                  for i in range(5)])])
    assert meta["loss_mask"] is False and meta["record_kinds"] == {"text": 5, "prompt_completion": 0, "messages": 0}
    assert all(mask is None for _, mask in _documents(path))


def test_prompt_completion_and_messages_with_text(tmp_path):
    sources = [_jsonl(tmp_path / "pc.jsonl", PC), _jsonl(tmp_path / "chat.jsonl", MSGS),
               _jsonl(tmp_path / "t.jsonl", [{"text": "a plain text document that is long enough"}])]
    meta, path = _prepare(tmp_path, sources)
    assert meta["loss_mask"] and meta["record_kinds"] == {"text": 1, "prompt_completion": 12, "messages": 8}
    assert meta["chat_template"]["source"] == "builtin"
    tok = load_tokenizer(path)
    docs = _documents(path)
    for (ids, mask), rec in zip(docs[:12], PC):  # prompt (no loss), then completion + EOS (loss)
        n = len(tok.encode(rec["prompt"]))
        assert ids == tok.encode(rec["prompt"]) + tok.encode(rec["completion"]) + [tok.eos_id]
        assert mask == [0] * n + [1] * (len(ids) - n)
    enc = RecordEncoder(tok, resolve_chat_template(None, tok)[0])
    for (ids, mask), rec in zip(docs[12:20], MSGS):
        want_ids, want_mask = enc.encode(rec)
        assert ids == want_ids.tolist() and mask == want_mask.tolist()
        assert tok.decode(np.asarray(ids)[np.asarray(mask, bool)].tolist()) == rec["messages"][1]["content"]
    ids, mask = docs[20]
    assert all(mask) and tok.decode(ids[:-1]) == "a plain text document that is long enough"
    assert meta["splits"]["train"]["num_target_tokens"] == sum(sum(m) for _, m in docs)


def test_records_cleaned_deduplicated_and_not_min_chars_filtered(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2", "id": 1}, {"prompt": "1+1=", "completion": "2", "id": 2},
            {"prompt": "a\r\nb\x07=", "completion": "c"}]
    meta, path = _prepare(tmp_path, [_jsonl(tmp_path / "pc.jsonl", rows)], min_chars=32)
    assert meta["num_docs"] == 2 and meta["stats"]["dropped_duplicate"] == 1  # extra fields are not part of a record
    tok = load_tokenizer(path)
    assert tok.decode(_documents(path)[1][0][:-1]) == "a\nb=c"


@pytest.mark.parametrize("rows, match", [
    ([{"text": "fine text document here"}, {"prompt": "p", "completion": "c"}],
     r"bad\.jsonl:2: a prompt_completion record in a file of text records \(line 1\); one shape per file"),
    ([{"prompt": "p"}], r"bad\.jsonl:1: no 'text', 'prompt'/'completion' or 'messages' field \(found \['prompt'\]\)"
                        r"|bad\.jsonl:1: fields \['prompt'\] do not make one record shape"),
    ([{"prompt": "p", "completion": 3}], r"bad\.jsonl:1: 'completion' is int, expected a string"),
    ([{"messages": []}], r"bad\.jsonl:1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], r"bad\.jsonl:1: messages\[0\] must be \{\"role\": one of "
                                                          r"system/user/assistant"),
    ([{"messages": [{"role": "user", "content": None}]}], r"bad\.jsonl:1: messages\[0\] must be"),
    ([{"text": "t", "messages": []}], r"bad\.jsonl:1: fields \['text', 'messages'\] do not make one record shape"),
    ([["not", "an", "object"]], r"bad\.jsonl:1: a line must be a JSON object, got list"),
])
def test_bad_lines_are_one_line_errors(tmp_path, rows, match):
    with pytest.raises(DataError, match=match) as err:
        _prepare(tmp_path, [_jsonl(tmp_path / "bad.jsonl", rows)])
    assert "\n" not in str(err.value)


def test_chat_template_in_the_config_hash(tmp_path):
    src = _jsonl(tmp_path / "chat.jsonl", MSGS)
    first, _ = _prepare(tmp_path, [src])
    again, _ = _prepare(tmp_path, [src])
    assert again["reused"]
    other = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    changed, path = _prepare(tmp_path, [src], chat_template=other)
    assert not changed["reused"] and changed["chat_template"]["source"] == "string"
    tok = load_tokenizer(path)
    assert tok.decode(_documents(path)[0][0]) == "user: reverse python\nassistant: nohtyp\n"


def test_shipped_chat_demo_is_the_generators_output_and_prepares(tmp_path):
    from megatrain.data.chat_demo import NUM_CONVERSATIONS, conversations, render_jsonl
    from megatrain.data.sources import chat_demo_path
    with open(chat_demo_path(), encoding="utf-8") as f:
        shipped = f.read()
    assert shipped == render_jsonl(conversations()), "run: python -m megatrain.data.chat_demo"
    records = [json.loads(line) for line in shipped.splitlines()]
    assert len(records) == NUM_CONVERSATIONS == len({json.dumps(r) for r in records})
    checked = 0
    for r in records:  # every answer is the computed one
        m = r["messages"]
        user, answer = m[-2]["content"], m[-1]["content"]
        if user.startswith("Reverse the word"):
            word = user.split("'")[1]
            assert answer == f"'{word}' reversed is '{word[::-1]}'."
            checked += 1
        if user.startswith("What is ") and len(m) <= 3 and " = " in answer:
            a, op, b = user[len("What is "):-1].split()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert answer == f"{a} {op} {b} = {value}."
            checked += 1
    assert checked > 40
    meta, _ = _prepare(tmp_path, ["chat_demo"], vocab_size=400)
    assert meta["record_kinds"]["messages"] == NUM_CONVERSATIONS and meta["loss_mask"]


def test_mask_shard_checksum_size_and_presence(tmp_path):
    import os
    from megatrain.data.dataset import PackedTokenDataset
    from megatrain.data.indexed import CorruptShardError
    from megatrain.data.prepared import _VERIFIED
    _, path = _prepare(tmp_path, [_jsonl(tmp_path / "pc.jsonl", PC)])
    mask = f"{path}/train-00000.mask"
    data = bytearray(open(mask, "rb").read())
    data[0] ^= 1  # same size, one flag flipped
    with open(mask, "wb") as f:
        f.write(data)
    _VERIFIED.clear()
    with pytest.raises(CorruptShardError, match=r"train-00000\.mask of split 'train' fails its checksum"):
        PackedTokenDataset(path, "train", 8)
    with open(mask, "wb") as f:
        f.write(data[:-1])
    with pytest.raises(CorruptShardError, match=r"train-00000\.mask: \d+ bytes but .* records \d+ tokens"):
        PackedTokenDataset(path, "train", 8, verify_checksums=False)
    os.remove(mask)
    with pytest.raises(DataError, match=r"train-00000\.mask of split .train. is missing"):
        PackedTokenDataset(path, "train", 8)
    with pytest.raises(DataError, match=r"train-00000\.mask is missing but .*meta\.json records a loss mask"):
        PackedTokenDataset(path, "train", 8, verify_checksums=False)
    again = prepare_corpus(DataConfig(sources=[str(tmp_path / "pc.jsonl")], path=path, vocab_size=400, num_workers=1,
                                      val_fraction=0.0))
    assert not again["reused"] and os.path.isfile(mask)  # prepare rebuilds a directory whose mask is gone


def test_worker_processes_encode_records_like_one_process(tmp_path, monkeypatch):
    from megatrain.data import prepare as prep
    rows = [{"messages": [{"role": "user", "content": f"what is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(60)]
    src = _jsonl(tmp_path / "chat.jsonl", rows)
    _, one = _prepare(tmp_path / "a", [src])
    monkeypatch.setattr(prep, "_BATCH_CHARS", 200)  # several batches, so two spawned workers share them
    _, two = _prepare(tmp_path / "b", [src], num_workers=2)
    assert _documents(one) == _documents(two)
    # a record the template refuses, met inside a worker: the same one-line error, naming the line
    template = ("{% for m in messages %}{% if m['content'] == 'q' %}{{ raise_exception('q is not allowed') }}"
                "{% endif %}{{ m['content'] + '\n' }}{% endfor %}")
    bad = _jsonl(tmp_path / "bad.jsonl", rows[:30] + [{"messages": [{"role": "user", "content": "q"}]}] + rows[30:])
    with pytest.raises(DataError, match=r"bad\.jsonl:31: chat template failed to render .*q is not allowed"):
        _prepare(tmp_path / "c", [bad], num_workers=2, chat_template=template, tokenizer=f"{one}/tokenizer.model")
