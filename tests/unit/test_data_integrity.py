"""Prepared data is verified: per-shard checksums at reuse and first open, token ids against the model's
vocabulary, meta.json against its tokenizer, prepared dirs keyed by source contents, data.force_prepare from
every launcher, and tokenizer sampling linear in line length."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from megatrain.config import DataConfig
from megatrain.data import prepare as prep
from megatrain.data import prepared
from megatrain.data.dataset import PackedTokenDataset
from megatrain.data.indexed import CorruptShardError
from megatrain.data.prepare import prepare_corpus
from megatrain.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _corpus(root, n=10):
    src = root / "src"
    src.mkdir(exist_ok=True)
    for i in range(n):
        (src / f"d{i:02d}.txt").write_text(f"doc {i}\n" + "".join(f"row {j} of doc {i}, words here\n" for j in range(20)))
    return src


def _cfg(tmp_path, **kw):
    return DataConfig(**{"path": str(tmp_path / "prepared"), "sources": [str(_corpus(tmp_path))], "vocab_size": 300,
                         "min_chars": 1, "num_workers": 1, "val_fraction": 0.2, **kw})


def _first_shard(path, split="train"):
    meta = json.load(open(os.path.join(path, "meta.json")))
    return os.path.join(path, meta["splits"][split]["shards"][0]), meta


def _scribble(bin_path):
    """Same size, different bytes: what a size check alone cannot see."""
    data = bytearray(open(bin_path, "rb").read())
    data[:16] = bytes((b ^ 0x5A) for b in data[:16])
    open(bin_path, "wb").write(bytes(data))


def test_checksums_recorded_and_same_size_garbage_is_rebuilt_on_reuse(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    first = prepare_corpus(cfg)
    shard, meta = _first_shard(first["path"])
    record = meta["splits"]["train"]["checksums"][os.path.basename(shard)]
    assert set(record) == {"bin_crc32", "idx_crc32", "max_id"} and 0 <= record["max_id"] < meta["vocab_size"]
    assert prepare_corpus(cfg)["reused"] is True
    _scribble(shard + ".bin")
    prepared._VERIFIED.clear()  # a new process: nothing verified yet
    with caplog.at_level(logging.WARNING, logger="megatrain.data"):
        again = prepare_corpus(cfg)
    assert again["reused"] is False and "fails its checksum" in caplog.text
    PackedTokenDataset(first["path"], "train", 8)  # the rebuilt dir verifies


def test_first_open_verifies_and_the_opt_out_skips(tmp_path):
    path = prepare_corpus(_cfg(tmp_path))["path"]
    shard, _ = _first_shard(path)
    _scribble(shard + ".bin")
    prepared._VERIFIED.clear()
    with pytest.raises(CorruptShardError, match=r"train-00000.bin of split 'train' fails its checksum.*force_prepare"):
        PackedTokenDataset(path, "train", 8)
    PackedTokenDataset(path, "train", 8, verify_checksums=False)  # data.verify_checksums=false: sizes only


def test_a_verified_shard_is_not_read_again_in_the_same_process(tmp_path, monkeypatch):
    path = prepare_corpus(_cfg(tmp_path))["path"]
    prepared._VERIFIED.clear()
    calls = []
    import megatrain.data.indexed as indexed
    real = indexed.file_crc32
    monkeypatch.setattr(indexed, "file_crc32", lambda p, *a: calls.append(p) or real(p, *a))
    PackedTokenDataset(path, "train", 8)
    n = len(calls)
    PackedTokenDataset(path, "train", 8)
    assert n == 2 and len(calls) == n  # .bin and .idx once, then cached by (path, size, mtime)


def test_token_ids_are_checked_against_model_vocab_size(tmp_path):
    path = prepare_corpus(_cfg(tmp_path))["path"]
    _, meta = _first_shard(path)
    PackedTokenDataset(path, "train", 8, vocab_size=meta["vocab_size"])
    with pytest.raises(DataError, match=r"train-00000.bin holds token id \d+ but model.vocab_size=40"):
        PackedTokenDataset(path, "train", 8, vocab_size=40)
    with pytest.raises(DataError, match="model.vocab_size=40"):  # without checksums the shard itself is read
        PackedTokenDataset(path, "train", 8, vocab_size=40, verify_checksums=False)


def test_meta_vocab_size_must_match_the_tokenizer(tmp_path):
    path = prepare_corpus(_cfg(tmp_path))["path"]
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["vocab_size"] = 100000
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    prepared._VERIFIED.clear()
    with pytest.raises(DataError, match=r"records vocab_size=100000 but its tokenizer .* has 300 pieces"):
        PackedTokenDataset(path, "train", 8)


def test_empty_validation_split_is_a_warning_not_silence(tmp_path, caplog):
    from megatrain.config import build_config
    from megatrain.train.lm_task import LanguageModelingTask
    cfg = _cfg(tmp_path)
    path = prepare_corpus(DataConfig(**dict(cfg.model_dump(), sources=[str(tmp_path / "src" / "d00.txt")])))["path"]
    task = LanguageModelingTask(build_config({"model": {"max_seq_len": 8}, "data": {"path": path}}))
    with caplog.at_level(logging.WARNING, logger="megatrain.data"):
        assert task.val_dataset() is None
    assert "validation split is empty (0 tokens), so this run has no validation" in caplog.text


def test_prepared_data_is_keyed_by_source_contents(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    assert prepare_corpus(cfg)["reused"] is False
    assert prepare_corpus(cfg)["reused"] is True
    doc = tmp_path / "src" / "d03.txt"
    doc.write_text(doc.read_text().replace("words", "WORDS"))  # same name, same size, new contents
    os.utime(doc, ns=(time.time_ns(), time.time_ns() + 10**9))
    with caplog.at_level(logging.WARNING, logger="megatrain.data"):
        assert prepare_corpus(cfg)["reused"] is False
    assert "the contents of data.sources changed since it was prepared; preparing again" in caplog.text
    (tmp_path / "src" / "new.txt").write_text("a brand new document with some text\n")
    assert prepare_corpus(cfg)["reused"] is False


def test_force_prepare_field_rebuilds(tmp_path):
    cfg = _cfg(tmp_path)
    prepare_corpus(cfg)
    forced = DataConfig(**dict(cfg.model_dump(), force_prepare=True))
    assert prepare_corpus(forced)["reused"] is False
    assert prepare_corpus(cfg)["reused"] is True


def test_force_prepare_builds_once_per_multi_rank_launch(tmp_path, monkeypatch):
    cfg = DataConfig(**dict(_cfg(tmp_path).model_dump(), force_prepare=True))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prepare_corpus(cfg)["reused"] is False   # the first rank of the launch rebuilds
    assert prepare_corpus(cfg)["reused"] is True    # the other rank of the same launch reuses that build
    monkeypatch.setenv("MASTER_PORT", "29556")      # a new launch rebuilds again
    assert prepare_corpus(cfg)["reused"] is False


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["prepare", "pretrain", "finetune"])
def test_force_prepare_works_from_every_launcher(tmp_path, launcher):
    """The launcher rebuilds data.path (meta.json rewritten), then the run goes on (or stops at its next check)."""
    cfg = _cfg(tmp_path)
    path = prepare_corpus(cfg)["path"]
    stamp = os.stat(os.path.join(path, "meta.json")).st_mtime_ns
    argv = [f"--data.path={path}", f"--data.sources=[{tmp_path / 'src'}]", "--data.vocab_size=300",
            "--data.min_chars=1", "--data.num_workers=1", "--data.val_fraction=0.2", "--data.force_prepare=true",
            f"--log.dir={tmp_path / 'run'}", "--train.seed=1234"]
    if launcher == "pretrain":
        argv += ["--config", "recipes/tiny_cpu_gpt.yaml", "--train.max_steps=1", "--model.max_seq_len=16",
                 "--train.global_batch_size=2", "--train.micro_batch_size=2", "--log.progress=none",
                 "--log.tensorboard=false", "--log.report=false", "--checkpoint.save_final=false",
                 "--train.eval_every=0", "--train.eval_batches=1"]
    if launcher == "finetune":  # an HF dir is needed; a missing one stops after the data step would run
        hf = _tiny_hf(tmp_path)
        argv += [f"--model.from_hf={hf}", f"--data.tokenizer={path}/tokenizer.model", "--train.max_steps=1",
                 "--train.global_batch_size=2", "--train.micro_batch_size=2", "--log.progress=none",
                 "--log.tensorboard=false", "--log.report=false", "--checkpoint.save_final=false",
                 "--train.eval_every=0", "--train.eval_batches=1"]
    proc = subprocess.run([sys.executable, f"launch/{launcher}.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.stat(os.path.join(path, "meta.json")).st_mtime_ns != stamp


def _tiny_hf(tmp_path):
    import torch
    import transformers
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    out = tmp_path / "hf"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    return out


def test_tokenizer_sample_is_linear_in_line_length():
    """One long line, 1 MB and 8 MB, each timed against a linear reference on the same string (one slice per
    2000 chars plus one copy), alternating, best of 3: the ratio to the reference stays flat (it grew ~6x
    when every cut copied the rest of the line)."""
    def best(fn):
        out = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    def relative_cost(n):
        line = "x" * n
        sample = best(lambda: sum(len(c) for c in prep._tokenizer_sample([line], 0, budget=10**12)))
        reference = best(lambda: sum(len(line[i:i + 2000]) for i in range(0, n, 2000)) + len(line[:]))
        assert sum(len(c) for c in prep._tokenizer_sample([line], 0, budget=10**12)) == n
        return sample / reference
    small, large = relative_cost(1 << 20), relative_cost(8 << 20)
    assert large / small < 3, (small, large)


def test_a_pathological_line_is_capped_by_the_budget_with_a_warning(caplog):
    line = "y" * (20 << 20) + "\n"
    with caplog.at_level(logging.WARNING, logger="megatrain.data"):
        chunks = list(prep._tokenizer_sample([line, "short doc\n"], 0, budget=1 << 20))
    assert sum(map(len, chunks)) <= (1 << 20) + prep._SENTENCE_CHARS
    assert max(map(len, chunks)) <= 2 * prep._SENTENCE_CHARS
    assert "line (document" in caplog.text and "split into" in caplog.text
