"""Continual training: resume a checkpoint on new data with a fresh schedule, keeping the optimizer state,
and report validation on the old data beside the new (forgetting)."""
import json

import pytest

from megatrain.config import build_config
from megatrain.data.prepare import prepare_corpus
from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.slow]


def test_continue_on_new_data_reports_old_validation(tiny_corpus, tmp_path):
    lines = [json.dumps({"text": f"SELECT col{i}, col{i + 1} FROM table_{i % 13} WHERE id = {i};\n" * 3})
             for i in range(300)]
    (tmp_path / "new.jsonl").write_text("\n".join(lines))
    new = tmp_path / "new_data"
    prepare_corpus(build_config({"data": {"path": str(new), "sources": [str(tmp_path / "new.jsonl")],
                                          "tokenizer": f"{tiny_corpus}/tokenizer.model", "val_fraction": 0.1,
                                          "min_chars": 1, "num_workers": 1}}).data, seed=0)
    first = tmp_path / "first"
    run_ranks(1, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, first, **{"train.max_steps": 4,
                                                                              "checkpoint.every": 4})], timeout=400)
    second = tmp_path / "second"
    run_ranks(1, ["launch/pretrain.py", *tiny_overrides(str(new), second, **{
        "train.max_steps": 6, "train.eval_every": 3, "checkpoint.resume": str(first / "checkpoints"),
        "checkpoint.reset_schedule": True, "eval.old_data": tiny_corpus})], timeout=400)
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # a new schedule from step 0
    assert rows[0]["lr"] < rows[2]["lr"]  # warmup again
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all("old_val_loss" in r and "old_val_ppl" in r for r in evals)
    assert rows[-1]["loss"] < rows[0]["loss"]
