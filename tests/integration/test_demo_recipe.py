"""The demo recipe end to end for ~30 steps on 2 ranks: loss at the end below the start, files written."""
import json

import pytest

from megatrain.testing import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def test_demo_recipe_learns(tiny_corpus, tmp_path):
    run_ranks(2, ["launch/pretrain.py", "--config", "recipes/tiny_cpu_gpt.yaml", f"--data.path={tiny_corpus}",
                  "--train.max_steps=30", "--train.warmup_steps=5", "--train.eval_every=15", "--checkpoint.every=15",
                  f"--log.dir={tmp_path}", "--log.progress=plain"], timeout=400)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens_per_s", "peak_mem_gib"} <= set(rows[0])
    assert "mfu" not in rows[0] and rows[0]["peak_mem_gib"] > 0  # CPU: no datasheet peak, RSS as memory
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "val_loss" in rows[14] and "val_ppl" in rows[-1]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert list((tmp_path / "tb").iterdir())
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000030"
