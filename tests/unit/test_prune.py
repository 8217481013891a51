"""Structured pruning: exactness of the surgery, importance against hand computation, sizes, bad inputs."""
import pytest
import torch

from megatrain.compress.importance import activation_scores, magnitude_scores, taylor_scores
from megatrain.weights.sources import load_model, save_model
from megatrain.compress.prune import Sizes, prune_model, step_sizes, target_sizes
from megatrain.compress.units import head_rows, keep_blocks, prune_heads, prune_mlp
from megatrain.config import ConfigError, build_config
from megatrain.config.schema import ModelConfig, PruneConfig
from megatrain.models.transformer import build_transformer

GPT2 = dict(arch="gpt2", vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, max_seq_len=16)
LLAMA = dict(arch="llama", vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=64, max_seq_len=16)


def _model(fields, seed=1):
    cfg = ModelConfig(**fields)
    return build_transformer(cfg, seed=seed), cfg


def _ids(seed=0):
    return torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fields", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_removing_a_dead_block_is_bit_exact(fields):
    model, _ = _model(fields)
    ids = _ids()
    with torch.no_grad():
        dead = model.layers[1]  # a block whose residual branches output exactly zero: x + 0 is x, bit for bit
        for lin in (dead.attn.o_proj, dead.mlp.down_proj):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
        ref = model(ids)
        keep_blocks(model, [0, 2])
        out = model(ids)
    assert len(model.layers) == 2
    assert torch.equal(out, ref)


# Removing zero MLP channels and heads shortens the reductions of down_proj / o_proj (K = f -> f - 2, Hq·d ->
# (Hq - 1)·d). In exact arithmetic the dropped terms are 0·x; in fp32 the BLAS blocks and vectorises a K=126
# reduction differently from a K=128 one, so partial sums round differently: on this project's AMD EPYC CI
# machine the outputs (magnitude 0.64) moved by 1.5e-8 (< 1 ulp of the largest) while another CPU gave bit
# equality. The bound is a few ulps; a wrong column removed moves outputs by ~1e-2.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-7), (torch.float64, 1e-15)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fields", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_removing_zero_units_is_exact_up_to_gemm_rounding(fields, dtype, tol):
    model, cfg = _model(fields)
    model = model.to(dtype)
    ids = _ids()
    d = cfg.attn_head_dim
    with torch.no_grad():
        for block in model.layers:  # zero MLP channels 1, 5 (their down columns) and query head 1 (its o columns)
            block.mlp.down_proj.weight[:, [1, 5]] = 0
            block.attn.o_proj.weight[:, d:2 * d] = 0
        ref = model(ids)
        f = cfg.ffn_size
        keep_ch = torch.tensor([i for i in range(f) if i not in (1, 5)])
        for block in model.layers:
            prune_mlp(block.mlp, keep_ch)
            if cfg.kv_heads == cfg.num_heads:
                prune_heads(block.attn, torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3]))
        out = model(ids)
    assert model.layers[0].mlp.up_proj.weight.shape[0] == f - 2
    torch.testing.assert_close(out, ref, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("fields,keep_q,keep_kv", [
    (GPT2, [0, 3], [0, 3]),            # multi-head: query and kv heads go together
    (LLAMA, [2, 3], [1]),              # GQA: a whole kv group (kv head 0 and its query heads 0, 1)
    (LLAMA, [0, 3], [0, 1]),           # GQA: one query head inside every group, kv heads kept
], ids=["mha", "gqa-group", "gqa-within"])
def test_removing_heads_equals_masking_them(fields, keep_q, keep_kv):
    model, cfg = _model(fields)
    ids = _ids(1)
    d = cfg.attn_head_dim
    masked = [h for h in range(cfg.num_heads) if h not in keep_q]

    def mask_heads(_mod, args):  # reference: the removed heads' outputs are zero before o_proj
        y = args[0].clone()  # (B, T, Hq·d)
        y[..., head_rows(torch.tensor(masked), d)] = 0
        return (y,)
    hooks = [b.attn.o_proj.register_forward_pre_hook(mask_heads) for b in model.layers]
    with torch.no_grad():
        ref = model(ids)
    for h in hooks:
        h.remove()
    for block in model.layers:
        prune_heads(block.attn, torch.tensor(keep_q), torch.tensor(keep_kv))
    with torch.no_grad():
        out = model(ids)
    assert model.layers[0].attn.q_proj.weight.shape[0] == len(keep_q) * d
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_importance_matches_hand_computation():
    model, cfg = _model(dict(LLAMA, num_layers=1))
    blk, d = model.layers[0], cfg.attn_head_dim
    a, m = blk.attn, blk.mlp
    l1, l2 = magnitude_scores(model, kind="l1"), magnitude_scores(model, kind="l2")
    # query head 1: its q rows and o columns
    hand = a.q_proj.weight[d:2 * d].abs().sum() + a.o_proj.weight[:, d:2 * d].abs().sum()
    torch.testing.assert_close(l1.q[0, 1], hand.double())
    # kv head 0: its k and v rows
    hand = a.k_proj.weight[:d].abs().sum() + a.v_proj.weight[:d].abs().sum()
    torch.testing.assert_close(l1.kv[0, 0], hand.double())
    # MLP channel 7 (SwiGLU): gate row, up row, down column; L2 is the root of the summed squares
    hand = (m.gate_proj.weight[7].square().sum() + m.up_proj.weight[7].square().sum()
            + m.down_proj.weight[:, 7].square().sum()).sqrt()
    torch.testing.assert_close(l2.final(l2.mlp[0, 7]), hand.double())

    ids = _ids(2)
    batches = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(1), "labels": ids.flip(1)}]

    def loss_fn(mod, b):
        return torch.nn.functional.cross_entropy(mod(b["input_ids"]).flatten(0, 1), b["labels"].flatten())
    tay = taylor_scores(model, batches, loss_fn)
    hand = torch.zeros((), dtype=torch.float64)
    for b in batches:  # Σ_batches |w·g| over the unit's elements (per-batch absolute value)
        model.zero_grad()
        loss_fn(model, b).backward()
        hand += (m.up_proj.weight[3] * m.up_proj.weight.grad[3]).double().abs().sum()
        hand += (m.gate_proj.weight[3] * m.gate_proj.weight.grad[3]).double().abs().sum()
        hand += (m.down_proj.weight[:, 3] * m.down_proj.weight.grad[:, 3]).double().abs().sum()
    torch.testing.assert_close(tay.mlp[0, 3], hand)

    act = activation_scores(model, batches[:1])
    with torch.no_grad():  # mean |SiLU(gate)·up| of channel 3 over the tokens, by hand
        h = model.embed(ids)  # (B, T, H)
        x = blk.mlp_norm(h + blk.attn(blk.attn_norm(h)))
        inner = torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x)  # (B, T, F)
    torch.testing.assert_close(act.mlp[0, 3], inner[..., 3].abs().mean().double(), rtol=1e-4, atol=1e-7)


def test_prune_model_keeps_the_most_important_units_and_reloads(tmp_path):
    model, cfg = _model(GPT2)
    scores = magnitude_scores(model, kind="l2")
    new = target_sizes(cfg, PruneConfig(mlp=0.5, layers=0.34))
    assert new == Sizes(num_layers=2, num_heads=4, num_kv_heads=4, ffn=64)
    pruned, pcfg = prune_model(model, cfg, scores, new)
    assert pcfg.ffn_hidden_size == 64 and pcfg.num_layers == 2
    dropped = int(scores.layer.argmin())
    kept = [i for i in range(3) if i != dropped]
    top = scores.mlp[kept[0]].topk(64).indices.sort().values
    torch.testing.assert_close(pruned.layers[0].mlp.up_proj.weight, model.layers[kept[0]].mlp.up_proj.weight[top])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_model(str(tmp_path / "p"), pruned, pcfg)
    again, again_cfg = load_model(str(tmp_path / "p"))
    assert again_cfg == pcfg
    ids = _ids(3)
    assert torch.equal(again(ids), pruned(ids))
    assert again.head.lm_head.weight is again.embed.wte.weight  # the tie survives the round trip


def test_gqa_sizes_and_iterative_steps():
    cfg = ModelConfig(**dict(LLAMA, num_heads=8, num_kv_heads=4, ffn_hidden_size=128))
    assert target_sizes(cfg, PruneConfig(heads=0.5, gqa="groups")) == Sizes(3, 4, 2, 128)
    assert target_sizes(cfg, PruneConfig(heads=0.5, gqa="within")) == Sizes(3, 4, 4, 128)
    start, target = Sizes.of(cfg), target_sizes(cfg, PruneConfig(mlp=0.5, layers=0.34), tp=2)
    steps = [step_sizes(start, target, i, 3, tp=2) for i in range(1, 4)]
    assert steps[-1] == target and all(s.ffn % 2 == 0 for s in steps)
    assert [s.ffn for s in steps] == sorted([s.ffn for s in steps], reverse=True)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"prune.mlp=1.0 would remove every unit") as e:
        build_config({"prune": {"mlp": 1.0}})
    assert "\n" not in str(e.value)
    cfg = ModelConfig(**GPT2)
    with pytest.raises(ValueError, match=r"keeps 3 of 4 query heads, not divisible by parallel.tp=2; use prune"):
        target_sizes(cfg, PruneConfig(heads=0.25), tp=2)
    with pytest.raises(ValueError, match=r"keeps 63 of 128 MLP channels, not divisible by parallel.tp=2"):
        target_sizes(cfg, PruneConfig(mlp=0.51), tp=2)
    with pytest.raises(ValueError, match=r"prune.layers=0.1 removes no block of 3"):
        target_sizes(cfg, PruneConfig(layers=0.1))
    with pytest.raises(ValueError, match=r"prune.mlp/heads/layers are for gpt2/llama Transformers"):
        target_sizes(ModelConfig(arch="lstm"), PruneConfig(mlp=0.5))
