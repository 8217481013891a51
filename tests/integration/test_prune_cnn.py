"""Channel pruning of the digits ResNet through the launch scripts: checkpoint → pruned dense model → table,
and the pruned config trains under launch/pretrain.py."""
import json

import pytest
import torch

from megatrain.weights.sources import load_model
from megatrain.testing import run_ranks

pytestmark = pytest.mark.slow

QUIET = ["--log.progress=none", "--log.tensorboard=false", "--log.report=false"]
TINY = ["--config", "recipes/cnn_digits.yaml", "--model.widths=[8,16]", "--model.blocks_per_stage=[1,1]",
        "--train.eval_every=0", "--train.eval_batches=2", *QUIET]


def test_prune_digits_cnn(tmp_path):
    orig = tmp_path / "orig"
    run_ranks(1, ["launch/pretrain.py", *TINY, "--train.max_steps=6", "--checkpoint.save_final=true",
                  f"--log.dir={orig}"], timeout=200)
    run_ranks(1, ["launch/prune.py", *TINY, f"--log.dir={tmp_path / 'p'}", f"--prune.source={orig}",
                  "--prune.channels=0.5", "--prune.importance=taylor", "--prune.calib_batches=2",
                  "--prune.schedule=iterative", "--prune.iterations=2", "--prune.finetune_steps=2",
                  "--prune.measure_batches=1", "--checkpoint.save_final=false"], timeout=200)
    pruned = tmp_path / "p" / "pruned"
    rows = json.loads((pruned / "prune.json").read_text())
    assert [r["model"] for r in rows] == ["original", "pruned", "pruned + fine-tuned"]
    assert [r["widths"] for r in rows] == ["8/16", "4/8", "4/8"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["flops_per_item"] < rows[0]["flops_per_item"]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["items_per_s"] > 0 for r in rows)
    assert "| pruned + fine-tuned | 4/8 |" in (pruned / "prune.md").read_text()
    model, cfg = load_model(str(pruned))  # a normal megatrain model: strict load against its config
    assert cfg.inner_widths == [4, 8] and cfg.widths == [8, 16]
    assert [s[0].conv1.out_channels for s in model.stages] == [4, 8] and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # the pruned model is an ordinary config: the Trainer continues from its weights (model.init_from); with a
    # vanishing learning rate the parameters stay the pruned ones and the BN statistics are the saved ones
    # moved by one step's momentum, not a fresh init's (mean 0, var 1)
    again = tmp_path / "again"
    run_ranks(1, ["launch/pretrain.py", *TINY, "--train.max_steps=1", "--model.inner_widths=[4,8]",
                  f"--model.init_from={pruned}", "--train.lr=1e-30", "--train.min_lr=0", "--train.warmup_steps=0",
                  "--train.weight_decay=0", f"--log.dir={again}"], timeout=200)
    cont, _ = load_model(str(again))
    ref = model.state_dict()
    for name, value in cont.state_dict().items():
        if name.endswith("running_var"):
            assert not torch.allclose(value, torch.ones_like(value)), name
            torch.testing.assert_close(value, ref[name], rtol=0.5, atol=0.05, msg=name)
        elif value.is_floating_point() and "running_mean" not in name:
            torch.testing.assert_close(value, ref[name], rtol=1e-6, atol=1e-6, msg=name)
    bad = run_ranks(1, ["launch/pretrain.py", *TINY, "--train.max_steps=1", f"--model.init_from={pruned}",
                        f"--log.dir={tmp_path / 'bad'}"], timeout=200, check=False)[0]
    assert bad.returncode != 0 and "pass --model.inner_widths=[4,8]" in bad.stderr, bad.stderr[-2000:]
