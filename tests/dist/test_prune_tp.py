"""Pruning under tensor parallelism: importance from sharded layers, gathered over tp, gives the tp=1 model."""
import pytest
from safetensors.torch import load_file

from megatrain.testing import run_ranks
from tests.conftest import TINY_LR, assert_same_trained_weights, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _prune(corpus, out, world, tp, **extra):
    args = tiny_overrides(corpus, out, "llama", **{"parallel.tp": tp, "prune.mlp": 0.5, "prune.layers": 0.5,
                                                  "prune.importance": "taylor", "prune.calib_batches": 2,
                                                  "prune.measure_batches": 1, **extra})
    run_ranks(world, ["launch/prune.py", *args], timeout=400)
    return load_file(str(out / "pruned" / "model.safetensors"))


def test_tp2_pruned_model_equals_tp1(tiny_corpus, tmp_path):
    # Taylor scores from sharded layers gathered over tp, then 2 fine-tuning steps under the Trainer at tp=2
    # and the full weights gathered back: the tp=1 result up to fp32 reduction order.
    one = _prune(tiny_corpus, tmp_path / "tp1", 1, 1, **{"prune.finetune_steps": 2})
    two = _prune(tiny_corpus, tmp_path / "tp2", 2, 2, **{"prune.finetune_steps": 2})
    assert one["layers.0.mlp.up_proj.weight"].shape[0] == 64  # 128 -> 64 channels, 2 -> 1 block
    assert_same_trained_weights(two, one, lr=TINY_LR)


def test_tp2_odd_kept_count_is_a_clear_error(tiny_corpus, tmp_path):
    args = tiny_overrides(tiny_corpus, tmp_path, "llama", **{"parallel.tp": 2, "prune.mlp": 0.51})
    res = run_ranks(2, ["launch/prune.py", *args], check=False, timeout=300)
    assert all(r.returncode == 2 for r in res)
    assert "keeps 63 of 128 MLP channels, not divisible by parallel.tp=2" in res[0].stderr
