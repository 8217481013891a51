"""prepare_corpus end to end on tiny corpora: round trip, split, idempotence, atomicity, bad inputs."""
import json
import logging
import os

import pytest

from megatrain.config import DataConfig
from megatrain.data import prepare as prep
from megatrain.data.indexed import ShardReader
from megatrain.data.prepare import prepare_corpus, split_documents
from megatrain.data.sources import SourceStats, iter_documents
from megatrain.data.tokenizer import load_tokenizer

CODE = "def f(x):\n    if x:\n\treturn  x + 1  \n    return None\n"


def _make_corpus(root):
    """A folder with code, prose with CRLF/control/combining characters, a duplicate, a short file,
    binaries, and a .jsonl. Returns the expected cleaned documents in source order."""
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.py").write_text(CODE)
    (src / "sub" / "b.txt").write_bytes("Caf\u0065\u0301 \x07bell\r\nline two 😀\rend\n".encode())
    (src / "sub" / "c.md").write_text(CODE)  # exact duplicate of a.py
    (src / "sub" / "short.txt").write_text("hi")
    (src / "img.png").write_bytes(bytes(range(256)))
    (src / "blob.dat").write_bytes(b"abc\x00def" * 10)
    for i in range(12):
        (src / f"m{i:02d}.txt").write_text(f"module {i}\n" + "    value = %d  # note\n" % i * (i + 3))
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"json document number {i} with\nnewlines", "id": i}) + "\n"
                             for i in range(3)) + "\n")
    expected = [CODE, "Caf\u00e9 bell\nline two 😀\nend\n"]
    expected[1:1] = ["module %d\n" % i + "    value = %d  # note\n" % i * (i + 3) for i in range(12)]
    expected += [f"json document number {i} with\nnewlines" for i in range(3)]
    return [str(src), str(jsonl)], expected


def _cfg(tmp_path, sources, **kw):
    kw = {"path": str(tmp_path / "prepared"), "vocab_size": 320, "min_chars": 10, "num_workers": 1,
          "val_fraction": 0.2, **kw}
    return DataConfig(sources=sources, **kw)


def _decoded_split(path, split):
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    tok = load_tokenizer(path)
    out = []
    for shard in meta["splits"][split]["shards"]:
        r = ShardReader(os.path.join(path, shard))
        for i in range(r.num_docs):
            doc = r.document(i).tolist()
            assert doc[-1] == meta["eos_id"] and meta["eos_id"] not in doc[:-1]
            out.append(tok.decode(doc[:-1]))
    return out


def test_sources_order_and_skips(tmp_path):
    sources, _ = _make_corpus(tmp_path)
    stats = SourceStats()
    origins = [o for o, _ in iter_documents(sources, stats)]
    assert [os.path.basename(o) for o in origins[:2]] == ["a.py", "m00.txt"]
    assert origins[-1].endswith("docs.jsonl:3") and stats.skipped_binary == 2


def test_round_trip_and_split(tmp_path):
    sources, expected = _make_corpus(tmp_path)
    summary = prepare_corpus(_cfg(tmp_path, sources), seed=7)
    is_val = split_documents(len(expected), 0.2, seed=7)
    assert is_val.sum() == round(len(expected) * 0.2)
    train = [d for d, v in zip(expected, is_val) if not v]
    val = [d for d, v in zip(expected, is_val) if v]
    path = summary["path"]
    assert _decoded_split(path, "train") == train  # exact text, documents in source order
    assert _decoded_split(path, "val") == val
    assert summary["splits"]["train"]["num_docs"] == len(train) and summary["splits"]["val"]["num_docs"] == len(val)
    assert summary["stats"]["dropped_duplicate"] == 1 and summary["stats"]["dropped_short"] == 1
    assert summary["stats"]["skipped_binary"] == 2
    assert summary["token_dtype"] == "uint16" and summary["eos_id"] == 2 and summary["reused"] is False
    assert summary["text_bytes"] == sum(len(d.encode()) for d in expected)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert meta["config_hash"] == summary["config_hash"] and meta["vocab_size"] <= 320


def test_split_deterministic_disjoint_and_nonempty():
    a = split_documents(100, 0.1, seed=1)
    assert (a == split_documents(100, 0.1, seed=1)).all() and a.sum() == 10
    assert not (a == split_documents(100, 0.1, seed=2)).all()
    assert split_documents(2, 0.01, seed=0).sum() == 1  # at least one val doc ...
    assert split_documents(3, 0.99, seed=0).sum() == 2  # ... and at least one train doc
    assert split_documents(1, 0.5, seed=0).sum() == 0 and split_documents(10, 0.0, seed=0).sum() == 0


def test_idempotent_force_and_config_change(tmp_path):
    sources, _ = _make_corpus(tmp_path)
    cfg = _cfg(tmp_path, sources)
    first = prepare_corpus(cfg)
    meta_path = os.path.join(first["path"], "meta.json")
    stamp = os.stat(meta_path).st_mtime_ns
    again = prepare_corpus(cfg)
    assert again["reused"] is True and os.stat(meta_path).st_mtime_ns == stamp
    assert again["config_hash"] == first["config_hash"]
    assert prepare_corpus(cfg, force=True)["reused"] is False
    changed = prepare_corpus(_cfg(tmp_path, sources, min_chars=40))
    assert changed["reused"] is False and changed["config_hash"] != first["config_hash"]
    assert prepare_corpus(_cfg(tmp_path, sources, min_chars=40, num_workers=2))["reused"] is True
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".prepared.") and not n.endswith(".lock")]
    assert leftovers == []


def test_parallel_workers_match_single_process(tmp_path, monkeypatch):
    sources, _ = _make_corpus(tmp_path)
    monkeypatch.setattr(prep, "_BATCH_CHARS", 64)  # many batches, so the worker pool really runs
    one = prepare_corpus(_cfg(tmp_path, sources, path=str(tmp_path / "one")))
    two = prepare_corpus(_cfg(tmp_path, sources, path=str(tmp_path / "two"), num_workers=2))
    for split in ("train", "val"):
        for shard in one["splits"][split]["shards"]:
            assert (tmp_path / "one" / f"{shard}.bin").read_bytes() == (tmp_path / "two" / f"{shard}.bin").read_bytes()


def test_interrupted_prepare_leaves_previous_dataset_intact(tmp_path, monkeypatch):
    sources, _ = _make_corpus(tmp_path)
    first = prepare_corpus(_cfg(tmp_path, sources))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(_cfg(tmp_path, sources, min_chars=40))
    monkeypatch.undo()
    assert prepare_corpus(_cfg(tmp_path, sources))["config_hash"] == first["config_hash"]
    assert prepare_corpus(_cfg(tmp_path, sources))["reused"] is True
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".prepared")) == [".prepared.lock"]
    # a fresh path interrupted mid-way leaves nothing that looks like a dataset
    monkeypatch.setattr(prep, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(_cfg(tmp_path, sources, path=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh").exists()


def test_corrupt_existing_shard_is_rebuilt(tmp_path):
    sources, _ = _make_corpus(tmp_path)
    first = prepare_corpus(_cfg(tmp_path, sources))
    with open(os.path.join(first["path"], "train-00000.bin"), "r+b") as f:
        f.truncate(10)
    assert prepare_corpus(_cfg(tmp_path, sources))["reused"] is False
    ShardReader(os.path.join(first["path"], "train-00000"))


def test_existing_sentencepiece_tokenizer(tmp_path):
    sources, expected = _make_corpus(tmp_path)
    first = prepare_corpus(_cfg(tmp_path, sources, val_fraction=0.0))
    model = tmp_path / "my.model"
    model.write_bytes(open(os.path.join(first["path"], "tokenizer.model"), "rb").read())
    second = prepare_corpus(_cfg(tmp_path, sources, val_fraction=0.0, path=str(tmp_path / "p2"),
                                 tokenizer=str(model)))
    assert second["tokenizer"]["source"] == str(model) and second["tokenizer"]["kind"] == "sentencepiece"
    assert _decoded_split(second["path"], "train") == expected
    assert (tmp_path / "p2" / "train-00000.bin").read_bytes() == (tmp_path / "prepared" / "train-00000.bin").read_bytes()


def test_hf_tokenizer_dir(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sources, expected = _make_corpus(tmp_path)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(expected, vocab_size=300, special_tokens=["<eos>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(tmp_path / "hf")
    summary = prepare_corpus(_cfg(tmp_path, sources, val_fraction=0.0, tokenizer=str(tmp_path / "hf")))
    assert summary["tokenizer"]["kind"] == "hf" and summary["eos_id"] == 0
    assert _decoded_split(summary["path"], "train") == expected


def test_max_bytes_stops_early(tmp_path):
    sources, expected = _make_corpus(tmp_path)
    summary = prepare_corpus(_cfg(tmp_path, sources, max_bytes=len(CODE) + 1, val_fraction=0.0))
    assert summary["num_docs"] == 2 and summary["stats"]["stopped_at_max_bytes"] is True
    assert _decoded_split(summary["path"], "train") == expected[:2]


def test_stdlib_source_is_sorted_python_without_site_packages():
    import itertools
    import sysconfig

    def first(n):
        return [o for o, _ in itertools.islice(iter_documents(["stdlib"], SourceStats()), n)]

    origins = first(40)
    assert origins == first(40)  # deterministic walk
    root = sysconfig.get_paths()["stdlib"]
    assert all(o.startswith(root) and o.endswith(".py") and "site-packages" not in o for o in origins)
    top = [o for o in origins if os.path.dirname(o) == root]
    assert top == sorted(top)


# ------------------------------------------------------------------------------------------- bad inputs

def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"data\.sources: .*nope does not exist"):
        prepare_corpus(_cfg(tmp_path, [str(tmp_path / "nope")]))


def test_empty_corpus(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("tiny")
    with pytest.raises(ValueError, match=r"no documents left .*1 shorter than data\.min_chars=10"):
        prepare_corpus(_cfg(tmp_path, [str(tmp_path / "d")]))
    assert not (tmp_path / "prepared").exists()


def test_undecodable_file_is_skipped_with_a_warning(tmp_path, caplog):
    sources, expected = _make_corpus(tmp_path)
    (tmp_path / "src" / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, a long line".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="megatrain.data"):
        summary = prepare_corpus(_cfg(tmp_path, sources, val_fraction=0.0))
    assert summary["stats"]["skipped_undecodable"] == 1 and summary["num_docs"] == len(expected)
    assert "latin1.txt" in caplog.text and "not valid UTF-8" in caplog.text


def test_only_undecodable_input_is_an_empty_corpus_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8 at all, long enough")
    with pytest.raises(ValueError, match="1 not UTF-8"):
        prepare_corpus(_cfg(tmp_path, [str(tmp_path / "bad.txt")]))


def test_jsonl_without_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a fine first document"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: no 'text', 'prompt'/'completion' or 'messages' field \(found \['body'\]\)"):
        prepare_corpus(_cfg(tmp_path, [str(p)]))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: not valid JSON"):
        prepare_corpus(_cfg(tmp_path, [str(p)]))


def test_foreign_directory_is_not_replaced(tmp_path):
    sources, _ = _make_corpus(tmp_path)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no meta.json"):
        prepare_corpus(_cfg(tmp_path, sources))
    assert (tmp_path / "prepared" / "mine.txt").read_text() == "keep me"
