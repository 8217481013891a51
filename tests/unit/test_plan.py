"""The preflight planner without any rank: activations equal what autograd keeps, parameter shares, the one-line
refusal that names a layout that fits, and the CLI."""
import subprocess
import sys

import pytest
import torch

from megatrain.config import build_config, load_config
from megatrain.config.schema import ModelConfig
from megatrain.models.transformer import build_transformer
from megatrain.plan import GIB, check_fits, plan_memory, propose
from megatrain.plan.activations import activation_bytes
from megatrain.plan.params import stage_params
from megatrain.testing import ROOT

TINY = [dict(arch="gpt2", vocab_size=100, hidden_size=64, num_layers=3, num_heads=4, max_seq_len=32),
        dict(arch="llama", vocab_size=100, hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=128,
             max_seq_len=32),
        dict(arch="llama", vocab_size=100, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=128, max_seq_len=32)]


def _saved_by_autograd(m: ModelConfig, batch: int, seq: int, **forward) -> int:
    """Bytes autograd keeps for one forward + loss on CPU (the reference ops), weights left out; ``forward``:
    extra model arguments, (B, T) each (positions, segments)."""
    model = build_transformer(m, seed=0).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in weights:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    ids = torch.randint(0, m.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logits = model(ids, **forward)
        torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.view(-1))
    return sum(seen.values())


@pytest.mark.parametrize("fields", TINY, ids=["gpt2", "llama", "llama-gqa"])
def test_meta_activation_count_equals_what_autograd_keeps(fields):
    m = ModelConfig(**fields)
    a = activation_bytes(m, micro_batch=2, seq_len=16, repeat_kv=True)  # CPU runs the reference attention
    predicted = a.embed + m.num_layers * a.per_block + a.head
    assert abs(predicted - _saved_by_autograd(m, 2, 16)) <= 512  # the position index (B·T int64 views) at most


def test_gqa_kernel_path_keeps_less_and_sp_divides_the_residual_stream():
    m = ModelConfig(**TINY[2])
    ref, kernel = (activation_bytes(m, micro_batch=2, seq_len=16, repeat_kv=r).per_block for r in (True, False))
    assert kernel == ref - 2 * (2 * 16 * 2 * 16 * 4)  # k and v: 2 kv heads of 16 instead of 4, fp32
    tp, sp = (activation_bytes(m, micro_batch=2, seq_len=16, tp=2, sequence_parallel=s) for s in (False, True))
    assert sp.per_block < tp.per_block < kernel and sp.checkpointed_block == tp.checkpointed_block // 2


def test_parameter_shares():
    m = ModelConfig(**TINY[0])  # gpt2, tied, vocab 100
    assert stage_params(m, tp=1, pp=1)[0].numel == build_transformer(m, seed=0).num_params()
    h, f, v = 64, 256, 100
    block_tp2 = (3 * h * h + 3 * h) // 2 + h * h // 2 + h + (h * f + f) // 2 + f * h // 2 + h + 4 * h  # + norms
    assert stage_params(m, tp=2, pp=1)[0].numel == v // 2 * h + 32 * h + 3 * block_tp2 + 2 * h
    stages = stage_params(m, tp=1, pp=2)
    assert sum(s.blocks for s in stages) == 3 and all("tokens" in s.layers or "lm head" in s.layers for s in stages)


def _recipe(**over):
    return load_config("recipes/llama_1b.yaml", [f"--{k}={v}" for k, v in over.items()])


def test_a_layout_over_budget_is_refused_in_one_line_with_one_that_fits():
    cfg = _recipe(**{"parallel.activation_checkpointing": "none", "parallel.zero_stage": 0,
                     "plan.gpu_memory_gib": 30})
    peak = max(r.peak for r in plan_memory(cfg, world_size=8))
    assert peak > 30 * GIB
    with pytest.raises(ValueError) as err:
        check_fits(cfg, world_size=8)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"plan.gpu_memory_gib=30: predicted peak {peak / GIB:.2f} GiB")
    assert "a layout that fits: --parallel.tp=1 --parallel.pp=1 --parallel.zero_stage=1" in msg
    fits = propose(cfg, world_size=8)
    assert fits and all(p <= 30 * GIB for _, p in fits) and fits[0][0].parallel.zero_stage == 1
    tiny = cfg.model_copy(update={"plan": cfg.plan.model_copy(update={"gpu_memory_gib": 1})})
    with pytest.raises(ValueError, match="no tp/pp/ZeRO/checkpointing layout of this world size fits"):
        check_fits(tiny, world_size=8)


def test_more_ranks_and_recomputation_need_less_memory():
    base = _recipe(**{"parallel.activation_checkpointing": "none"})
    peak = lambda cfg, w: max(r.peak for r in plan_memory(cfg, world_size=w))  # noqa: E731
    assert peak(base, 16) < peak(base, 8)  # ZeRO-1 divides the optimizer state over dp
    assert peak(_recipe(), 8) < peak(base, 8)
    assert peak(_recipe(**{"parallel.tp": 2}), 8) < peak(_recipe(), 8)
    with pytest.raises(ValueError, match="memory planner models Transformers"):
        plan_memory(build_config({"model": {"arch": "resnet", "task": "classification"}}), world_size=1)


def test_plan_cli_prints_the_table_and_exits_2_when_it_does_not_fit():
    ok = subprocess.run([sys.executable, "launch/plan.py", "--config", "recipes/llama_1b.yaml", "--plan.world_size=8",
                         "--plan.gpu_memory_gib=80", "--propose=3"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| stage | blocks | params/rank |" in ok.stdout and "fits: peak" in ok.stdout
    assert ok.stdout.count("| 1 | 1 | 8 |") >= 1
    bad = subprocess.run([sys.executable, "launch/plan.py", "--config", "recipes/llama_1b.yaml", "--plan.world_size=8",
                          "--plan.gpu_memory_gib=2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: plan.gpu_memory_gib=2: predicted peak")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_bad_planner_inputs_are_one_line_errors(tmp_path):
    from megatrain.config import ConfigError
    from megatrain.plan import with_vocab
    cfg = build_config({"model": {"arch": "llama", "vocab_size": 0}, "data": {"path": str(tmp_path / "none")}})
    with pytest.raises(ValueError, match=r"model.vocab_size is 0 and data.path=.*none has no prepared data to read "
                                         r"it from; set --model.vocab_size or run launch/prepare.py first"):
        with_vocab(cfg)
    for field, value in (("plan.gpu_memory_gib", 0), ("plan.reserved_gib", -1), ("plan.world_size", 0),
                         ("log.hang_report_s", -5)):
        with pytest.raises(ConfigError, match=field.split(".")[1]):
            load_config(None, [f"--{field}={value}"])
    with pytest.raises(ValueError, match=r"parallel.tp\*parallel.pp=3 does not divide world size 8"):
        plan_memory(_recipe(**{"parallel.tp": 3}), world_size=8)
