"""Document packing (data.packing documents|none) on hand-made shards: exact rows, truncation, the cached plan,
determinism, train_on_prompt, and which dataset LanguageModelingTask picks."""
import json
import logging
import os
import pickle

import numpy as np
import pytest

from megatrain.data.dataset import PackedTokenDataset
from megatrain.data.indexed import ShardWriter
from megatrain.data.packing import DocumentPackedDataset, pack_documents

EOS, PAD = 2, 3


def _write_dir(root, docs, masks=None, *, pad_id=PAD):
    """A prepared dir by hand: train split = ``docs`` (lists of ids, each already ending in EOS) and their masks."""
    root.mkdir(parents=True, exist_ok=True)
    with_mask = masks is not None
    w = ShardWriter(str(root / "train-00000"), np.uint16, with_mask=with_mask)
    for i, d in enumerate(docs):
        w.add(np.asarray(d), np.asarray(masks[i]) if with_mask else None)
    w.close()
    meta = {"format_version": 1, "vocab_size": 100, "eos_id": EOS, "pad_id": pad_id, "loss_mask": with_mask,
            "splits": {"train": {"num_docs": len(docs), "num_tokens": sum(map(len, docs)),
                                 "shards": ["train-00000"], "checksums": {"train-00000": w.record}}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root)


# doc lengths 3, 4, 6, 2 (EOS included); mask 0 = prompt token
DOCS = [[10, 11, EOS], [20, 21, 22, EOS], [30, 31, 32, 33, 34, EOS], [40, EOS]]
MASKS = [[0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1]]


def test_pack_documents_next_fit():
    assert pack_documents(np.array([3, 4, 6, 2]), 8).tolist() == [0, 2, 4]
    assert pack_documents(np.array([8, 1, 9, 3]), 8).tolist() == [0, 1, 2, 3, 4]  # 9 is capped at 8: own row
    assert pack_documents(np.array([], dtype=np.int64), 8).tolist() == [0]


def test_documents_rows_exact(tmp_path):
    ds = DocumentPackedDataset(_write_dir(tmp_path / "d", DOCS, MASKS), "train", 8)
    assert len(ds) == 2
    r0, r1 = ds[0], ds[1]
    assert r0["input_ids"].tolist() == [10, 11, EOS, 20, 21, 22, EOS, PAD]
    # label t = token t+1 of the same document when that token is a target; -100 at each document's last token
    assert r0["labels"].tolist() == [11, EOS, -100, -100, 22, EOS, -100, -100]
    assert r0["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert r0["segments"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]  # the padding is its own segment
    assert r1["input_ids"].tolist() == [30, 31, 32, 33, 34, EOS, 40, EOS]
    assert r1["labels"].tolist() == [-100, -100, 33, 34, EOS, -100, EOS, -100]
    assert r1["positions"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert r1["segments"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert all(v.dtype == r0["input_ids"].dtype for v in r0.values()) and r0["input_ids"].dtype.is_floating_point is False


def test_train_on_prompt_keeps_prompt_labels(tmp_path):
    ds = DocumentPackedDataset(_write_dir(tmp_path / "d", DOCS, MASKS), "train", 8, train_on_prompt=True)
    assert ds[0]["labels"].tolist() == [11, EOS, -100, 21, 22, EOS, -100, -100]
    assert ds[1]["labels"].tolist() == [31, 32, 33, 34, EOS, -100, EOS, -100]


def test_none_mode_one_document_per_row(tmp_path):
    ds = DocumentPackedDataset(_write_dir(tmp_path / "d", DOCS, MASKS), "train", 8, packing="none")
    assert len(ds) == 4
    r = ds[1]
    assert r["input_ids"].tolist() == [20, 21, 22, EOS, PAD, PAD, PAD, PAD]
    assert r["labels"].tolist() == [-100, 22, EOS, -100, -100, -100, -100, -100]
    assert r["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert r["segments"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not (tmp_path / "d" / "packing").exists()  # nothing to plan


def test_long_document_truncated_counted_and_warned_once(tmp_path, caplog):
    docs = [[5, 6, EOS], list(range(10, 20)) + [EOS], [7, EOS]]
    path = _write_dir(tmp_path / "d", docs, [[1] * len(d) for d in docs], pad_id=None)  # no pad id: pad with EOS
    with caplog.at_level(logging.WARNING, logger="megatrain.data"):
        ds = DocumentPackedDataset(path, "train", 4)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert ds.num_truncated == 1 and len(warnings) == 1 and "1 of 3 documents" in warnings[0]
    assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] == [[5, 6, EOS, EOS], [10, 11, 12, 13], [7, EOS, EOS, EOS]]
    assert ds[1]["labels"].tolist() == [11, 12, 13, -100]  # the cut document's last kept token predicts nothing


def test_plan_cached_deterministic_and_index_stable(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 99, size=n)) + [EOS] for n in rng.integers(1, 20, size=200)]
    path = _write_dir(tmp_path / "d", docs, [[1] * len(d) for d in docs])
    a = DocumentPackedDataset(path, "train", 32)
    plan = os.path.join(path, "packing", "train-T32.npy")
    assert os.path.isfile(plan) and np.load(plan).tolist() == pack_documents(np.array([len(d) for d in docs]), 32).tolist()
    b = DocumentPackedDataset(path, "train", 32)  # reads the cached plan
    c = pickle.loads(pickle.dumps(a))            # what a DataLoader worker gets
    for i in (0, 7, len(a) - 1):
        for k in ("input_ids", "labels", "positions", "segments"):
            assert a[i][k].tolist() == b[i][k].tolist() == c[i][k].tolist()
    # every document appears exactly once, whole, in order
    seen = [tok for i in range(len(a)) for tok, s in zip(a[i]["input_ids"].tolist(), a[i]["segments"].tolist())
            if s < len(a.row_documents(i))]
    assert seen == [t for d in docs for t in d]
    with open(plan, "wb") as f:  # a damaged plan is recomputed, never trusted
        np.save(f, np.array([0, 5, 3]))
    assert DocumentPackedDataset(path, "train", 32)[3]["input_ids"].tolist() == a[3]["input_ids"].tolist()
    assert np.load(plan).tolist() == a._rows.tolist()


def test_stream_mode_masks_prompt_labels(tmp_path):
    path = _write_dir(tmp_path / "d", DOCS, MASKS)
    ds = PackedTokenDataset(path, "train", 4)
    stream = [t for d in DOCS for t in d]
    flags = [m for d in MASKS for m in d]
    for i in range(len(ds)):
        want = [stream[j + 1] if flags[j + 1] else -100 for j in range(4 * i, 4 * i + 4)]
        assert ds[i]["labels"].tolist() == want
    everything = PackedTokenDataset(path, "train", 4, train_on_prompt=True)
    assert everything[0]["labels"].tolist() == stream[1:5]


def test_lm_task_picks_dataset_from_meta_and_config(tmp_path):
    from megatrain.config.loader import build_config
    from megatrain.train.lm_task import LanguageModelingTask
    sft = _write_dir(tmp_path / "sft", DOCS, MASKS)
    text = _write_dir(tmp_path / "text", DOCS)

    def task(path, **data):
        return LanguageModelingTask(build_config({"model": {"max_seq_len": 8, "vocab_size": 100},
                                                 "data": {"path": path, **data}}))
    assert type(task(sft).train_dataset()) is DocumentPackedDataset and task(sft).train_dataset().packing == "documents"
    assert type(task(text).train_dataset()) is PackedTokenDataset
    assert type(task(sft, packing="stream").train_dataset()) is PackedTokenDataset
    assert task(text, packing="none").train_dataset().packing == "none"
    assert task(sft, train_on_prompt=True).train_dataset()[0]["labels"].tolist()[3] == 21


def test_read_only_data_dir_plans_in_memory(tmp_path, monkeypatch):
    path = _write_dir(tmp_path / "d", DOCS, MASKS)
    import megatrain.data.packing as packing

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(packing.tempfile, "mkstemp", refuse)
    ds = DocumentPackedDataset(path, "train", 8)
    assert len(ds) == 2 and ds[1]["input_ids"].tolist()[:2] == [30, 31]
    assert not os.listdir(os.path.join(path, "packing"))
