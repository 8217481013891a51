"""The planner against real engines: the parameters each rank's module holds (tp × pp, tied and untied) and the
live tensor bytes of training ranks (ZeRO 0/1/3, fp32/bf16), measured by megatrain.plan.measure."""
import json

import pytest

from megatrain.config import load_config
from megatrain.plan import plan_memory
from megatrain.plan.params import stage_params
from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _measure(corpus, log_dir, world, arch, **extra):
    args = tiny_overrides(corpus, log_dir, arch=arch, **{"log.hang_report_s": 0, **extra})
    ranks = [json.loads(r.stdout.strip().splitlines()[-1])
             for r in run_ranks(world, ["-m", "megatrain.plan.measure", *args], timeout=400)]
    cfg = load_config(None, args)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 512})}), ranks


@pytest.mark.parametrize("arch, extra", [
    ("gpt2", {"parallel.tp": 2, "parallel.pp": 2}),  # tied: the token table on both end stages, vocab padded
    ("llama", {"parallel.tp": 2, "parallel.pp": 2, "parallel.pipeline_partition": "uniform",
               "model.num_layers": 3}),
    ("llama", {"parallel.tp": 2, "parallel.pp": 2, "model.num_kv_heads": 1, "model.qkv_bias": True,
               "model.qk_norm": True}),  # one kv head (and its biases) replicated on both tp ranks
], ids=["gpt2-tp2pp2", "llama-tp2pp2-uniform", "qwen-like-kv1-tp2pp2"])
def test_parameters_per_rank_equal_the_engines(tiny_corpus, tmp_path, arch, extra):
    cfg, ranks = _measure(tiny_corpus, tmp_path, 4, arch, **{"train.micro_batch_size": 2, **extra})
    stages = stage_params(cfg.model, tp=2, pp=2, partition=cfg.parallel.pipeline_partition)
    for r in ranks:
        assert r["local_params"] == stages[r["pp_rank"]].numel, r


LLAMA = {"model.hidden_size": 128, "model.ffn_hidden_size": 256, "train.micro_batch_size": 2}


@pytest.mark.parametrize("world, zero, precision", [(1, 0, "fp32"), (2, 1, "bf16"), (2, 3, "fp32")],
                         ids=["dp1-zero0-fp32", "dp2-zero1-bf16", "dp2-zero3-fp32"])
def test_predicted_bytes_equal_the_live_tensors(tiny_corpus, tmp_path, world, zero, precision):
    cfg, ranks = _measure(tiny_corpus, tmp_path, world, "llama", **LLAMA, **{
        "parallel.zero_stage": zero, "train.precision": precision, "train.global_batch_size": 2 * world,
        "plan.reserved_gib": 0})
    (row,) = plan_memory(cfg, world_size=world)
    states = row.weights + row.master + row.adam
    z3 = row.grads + row.bucket + row.gathered if zero == 3 else 0.0  # ZeRO-3 keeps these between steps
    for r in ranks:
        # after the step: weights, master copy and Adam state (+ ZeRO-3's gradient partition and bucket)
        assert r["step"] == pytest.approx(states + (row.grads + row.bucket if zero == 3 else 0), rel=0.02)
        # end of the forward: + this micro-batch's activations (+ the weights ZeRO-3 gathered)
        assert r["forward"] == pytest.approx(states + z3 + row.activations, rel=0.02)
        assert r["in_backward"] <= row.peak  # the peak adds every term, so it bounds the busiest moment
        if zero in (1, 2):  # DeepSpeed's reduce bucket exists during the backward
            assert r["in_backward"] >= row.bucket


def test_training_refuses_a_layout_that_does_not_fit_before_any_process_group(tiny_corpus, tmp_path):
    args = tiny_overrides(tiny_corpus, tmp_path, "llama", **{"plan.gpu_memory_gib": 0.5})  # < reserved 1 GiB
    for r in run_ranks(2, ["launch/pretrain.py", *args], timeout=120, check=False):
        assert r.returncode == 2
        assert r.stderr.startswith("error: plan.gpu_memory_gib=0.5: predicted peak ")
        assert "no tp/pp/ZeRO/checkpointing layout of this world size fits" in r.stderr
        assert "megatrain:" not in r.stdout  # the Trainer never started
