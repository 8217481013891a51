"""PackedTokenDataset: windows over the EOS-separated stream, shards crossed, clear errors."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from megatrain.config import DataConfig
from megatrain.data import prepare as prep
from megatrain.data.dataset import PackedTokenDataset
from megatrain.data.indexed import CorruptShardError, ShardReader
from megatrain.data.prepare import prepare_corpus


def _prepared(tmp_path, name="p", **kw):
    src = tmp_path / "src"
    if not src.exists():
        src.mkdir()
        for i in range(20):
            (src / f"f{i:02d}.py").write_text(f"# file {i}\n" + f"def f{i}(x):\n    return x * {i}\n" * (i + 2))
    cfg = DataConfig(path=str(tmp_path / name), sources=[str(src)], vocab_size=300, min_chars=1,
                     num_workers=1, val_fraction=0.1, **kw)
    return prepare_corpus(cfg, seed=3)["path"]


def _stream(path, split):
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    return np.concatenate([np.asarray(ShardReader(os.path.join(path, s)).tokens, dtype=np.int64)
                           for s in meta["splits"][split]["shards"]])


def test_samples_tile_the_stream(tmp_path):
    path = _prepared(tmp_path)
    ds = PackedTokenDataset(path, "train", seq_len=16)
    stream = _stream(path, "train")
    assert len(ds) == (len(stream) - 1) // 16 and ds.num_tokens == len(stream)
    for i in (0, 1, len(ds) - 1):
        s = ds[i]
        assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (16,) and s["labels"].shape == (16,)
        assert s["input_ids"].tolist() == stream[i * 16:(i + 1) * 16].tolist()
        assert s["labels"].tolist() == stream[i * 16 + 1:(i + 1) * 16 + 1].tolist()  # next tokens
    assert (stream == ds.eos_id).sum() == ds.meta["splits"]["train"]["num_docs"]  # EOS between documents
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_windows_cross_shard_boundaries(tmp_path, monkeypatch):
    one = _prepared(tmp_path, "one")
    monkeypatch.setattr(prep, "_SHARD_TOKENS", 50)  # many small shards
    many = _prepared(tmp_path, "many")
    assert len(json.loads(open(os.path.join(many, "meta.json")).read())["splits"]["train"]["shards"]) > 3
    a, b = PackedTokenDataset(one, "train", 24), PackedTokenDataset(many, "train", 24)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])


def test_pickle_reopens_the_shards(tmp_path):
    ds = PackedTokenDataset(_prepared(tmp_path), "val", seq_len=8)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 10_000  # the path travels, not the tokens
    assert torch.equal(clone[len(ds) - 1]["labels"], ds[len(ds) - 1]["labels"])


def test_too_short_split_names_split_and_fix(tmp_path):
    path = _prepared(tmp_path)
    n = PackedTokenDataset(path, "val", seq_len=1).num_tokens
    with pytest.raises(ValueError, match=r"split 'val' .* fewer than one sample .*lower data\.seq_len.*val_fraction"):
        PackedTokenDataset(path, "val", seq_len=n)


def test_truncated_shard_is_detected_on_open(tmp_path):
    path = _prepared(tmp_path)
    with open(os.path.join(path, "train-00000.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptShardError, match=r"train-00000\.bin: 100 bytes"):
        PackedTokenDataset(path, "train", seq_len=16)


def test_missing_data_dir_and_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="no meta.json.*launch/prepare.py"):
        PackedTokenDataset(str(tmp_path), "train", 16)
    with pytest.raises(ValueError, match="split 'test' not in"):
        PackedTokenDataset(_prepared(tmp_path), "test", 16)
