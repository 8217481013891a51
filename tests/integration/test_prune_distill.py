"""The prune → distill flow through the launch scripts: checkpoint → smaller dense model → distilled, tables."""
import json

import pytest
import torch

from megatrain.weights.sources import load_model
from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_pretrain_prune_distill(tiny_corpus, tmp_path):
    orig = tmp_path / "orig"
    run_ranks(1, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, orig, **{"train.max_steps": 4,
                                                                               "checkpoint.save_final": True})])
    common = {"train.max_steps": 4, "prune.measure_batches": 1, "prune.calib_batches": 2}
    run_ranks(1, ["launch/prune.py", *tiny_overrides(tiny_corpus, tmp_path / "p", **common, **{
        "prune.source": str(orig), "prune.mlp": 0.5, "prune.layers": 0.5, "prune.importance": "activation",
        "prune.schedule": "iterative", "prune.iterations": 2, "prune.finetune_steps": 2})])
    pruned = tmp_path / "p" / "pruned"
    rows = json.loads((pruned / "prune.json").read_text())
    assert [r["model"] for r in rows] == ["original", "pruned", "pruned + fine-tuned"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["flops_per_token"] < rows[0]["flops_per_token"]
    model, cfg = load_model(str(pruned))  # a normal megatrain model: strict load against its config
    assert (cfg.num_layers, cfg.ffn_hidden_size) == (1, 128)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, cfg.vocab_size)

    run_ranks(2, ["launch/distill.py", *tiny_overrides(tiny_corpus, tmp_path / "d", **common, **{
        "distill.teacher": str(orig), "distill.student": str(pruned), "parallel.tp": 2})])
    rows = json.loads((tmp_path / "d" / "compression.json").read_text())
    assert [r["model"] for r in rows] == ["original (teacher)", "pruned (student)", "distilled"]
    assert "| distilled |" in (tmp_path / "d" / "compression.md").read_text()
    distilled, dcfg = load_model(str(tmp_path / "d" / "distilled"))
    assert dcfg == cfg and not torch.equal(distilled.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)
