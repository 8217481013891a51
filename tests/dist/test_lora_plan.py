"""The planner with LoRA against real engines: parameters and trainable parameters per rank under tp × pp
(adapters sharded like their bases, DeepSpeed balancing stages by trainable parameters), and the live tensor
bytes of LoRA ranks under ZeRO-1 — optimizer state and gradients for the adapters only."""
import pytest

from megatrain.config.schema import LoraConfig
from megatrain.plan import plan_memory
from megatrain.plan.params import stage_params
from tests.dist.test_plan import LLAMA, _measure

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LORA = {"model.lora.rank": 4, "model.lora.targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"]}


def test_lora_parameters_per_rank_equal_the_engines(tiny_corpus, tmp_path):
    extra = {"parallel.tp": 2, "parallel.pp": 2, "model.num_kv_heads": 1, "model.num_layers": 3,
             "train.micro_batch_size": 2, "train.freeze": ["layers.<1"]}
    cfg, ranks = _measure(tiny_corpus, tmp_path, 4, "llama", **LORA, **extra)
    stages = stage_params(cfg.model, tp=2, pp=2, partition=cfg.parallel.pipeline_partition, freeze=cfg.train.freeze)
    # DeepSpeed balances trainable parameters: block 0 (frozen, adapters included) adds nothing to stage 0
    assert [s.blocks for s in stages] == [2, 1] and stages[0].trainable == stages[1].trainable
    for r in ranks:
        assert (r["local_params"], r["local_trainable"]) == (stages[r["pp_rank"]].numel,
                                                            stages[r["pp_rank"]].trainable), r


def test_lora_predicted_bytes_equal_the_live_tensors(tiny_corpus, tmp_path):
    cfg, ranks = _measure(tiny_corpus, tmp_path, 2, "llama", **LLAMA, **LORA, **{
        "parallel.zero_stage": 1, "train.global_batch_size": 4, "plan.reserved_gib": 0})
    (row,) = plan_memory(cfg, world_size=2)
    full = plan_memory(cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora": LoraConfig()})}),
                       world_size=2)[0]
    assert row.trainable < row.params // 10 and row.adam < full.adam / 10
    for r in ranks:
        assert r["step"] == pytest.approx(row.weights + row.master + row.adam, rel=0.02)
        assert r["forward"] == pytest.approx(row.weights + row.master + row.adam + row.activations, rel=0.02)
        assert r["in_backward"] <= row.peak
