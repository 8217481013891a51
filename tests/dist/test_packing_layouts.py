"""Packed, loss-masked rows (tests/dist/packed_task.py) train the same under every layout: the logged loss and the
trained weights of (dp=1, grad_accum=2) equal those of dp=2, pp=2, tp=2 with sequence parallelism, ZeRO-3, and
tp=2 / pp=2 under activation checkpointing.

SGD without momentum, so the update is the gradient itself (a wrong normaliser or a lost document mask changes
it by far more than fp32 reduction order, ~1e-7 relative). The rows' label counts differ widely between
micro-batches, so a mean of micro-batch means would not match (tests/unit/test_loss_normalisation.py shows it).
"""
import json

import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 3
LAYOUTS = {  # name: (world, overrides)
    "dp2": (2, {}),
    "pp2": (2, {"parallel.pp": 2}),
    "tp2sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "dp2zero3": (2, {"parallel.zero_stage": 3}),
    # activation checkpointing: the recompute gets the ids, under tp with sp and on pipeline stages
    "tp2spckpt": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.activation_checkpointing": "every"}),
    "pp2ckpt": (2, {"parallel.pp": 2, "parallel.activation_checkpointing": "every"}),
}


def _train(corpus, log_dir, arch, world, **extra):
    from megatrain.checkpoint.layout_free import load_model_state
    args = tiny_overrides(corpus, log_dir, arch=arch, **{
        "model.vocab_size": 96, "train.max_steps": STEPS, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.5, "train.warmup_steps": 0,
        "checkpoint.save_final": True, "train.eval_every": STEPS, "train.eval_batches": 0, **extra})  # the whole split
    run_ranks(world, ["tests/dist/packed_task.py", *args], timeout=600)
    with open(log_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return records, load_model_state(str(log_dir / "checkpoints"))[1]


@pytest.fixture(scope="module")
def references(tiny_corpus, tmp_path_factory):
    return {arch: _train(tiny_corpus, tmp_path_factory.mktemp(f"ref_{arch}"), arch, 1) for arch in ("llama", "gpt2")}


def _assert_same(got, ref, what):
    (records, state), (ref_records, ref_state) = got, ref
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r, q in zip(records, ref_records):
        assert r["loss"] == pytest.approx(q["loss"], rel=2e-5), f"{what}: step {r['step']}"
    assert records[-1]["val_loss"] == pytest.approx(ref_records[-1]["val_loss"], rel=2e-5), what
    assert state.keys() == ref_state.keys()
    import torch
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


@pytest.mark.parametrize("layout", ["dp2", "dp2zero3", "tp2spckpt", "pp2ckpt"])  # gpt2 runs plain pp2 and tp2sp
def test_llama_layout_matches_one_process(tiny_corpus, tmp_path, references, layout):
    world, extra = LAYOUTS[layout]
    _assert_same(_train(tiny_corpus, tmp_path, "llama", world, **extra), references["llama"], layout)


@pytest.mark.parametrize("layout", ["pp2", "tp2sp"])
def test_gpt2_learned_positions_restart_under(tiny_corpus, tmp_path, references, layout):
    # gpt2's learned positions come from the packed positions: on the first pipeline stage (blocks on the second
    # get the segments through the pipeline's activations), and before the sequence-parallel split
    world, extra = LAYOUTS[layout]
    _assert_same(_train(tiny_corpus, tmp_path, "gpt2", world, **extra), references["gpt2"], f"gpt2 {layout}")


def test_reference_loss_is_the_global_token_mean(tiny_corpus, references):
    import torch
    from megatrain.config import load_config
    from megatrain.data.sampler import GlobalBatchSampler
    from megatrain.models.transformer import build_transformer
    from tests.dist.packed_task import ROWS, packed_row, true_token_mean
    cfg = load_config(None, tiny_overrides(tiny_corpus, "unused", arch="llama", **{"model.vocab_size": 96}))
    rows = [packed_row(i, 32, 96) for i in GlobalBatchSampler(ROWS, 8, cfg.train.seed).indices_for_step(0)]
    expected = true_token_mean(build_transformer(cfg.model, seed=cfg.train.seed), rows)
    assert references["llama"][0][0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(torch.tensor(expected))
