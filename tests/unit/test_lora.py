"""LoRA transform and train.freeze on one process: a fresh adapter leaves logits unchanged, only adapters get
gradients and optimizer groups, merging folds W + (alpha/r)·B A exactly, freeze patterns and their errors."""
import pytest
import torch

from megatrain.config import build_config
from megatrain.errors import ConfigError
from megatrain.models.build import build_model
from megatrain.models.transformer import build_transformer
from megatrain.parallelize import parallelize
from megatrain.parallelize.lora import adapter_init, merge_lora_state, trainable_count
from megatrain.train.regularization import param_groups
from tests.conftest import TINY_MODELS


def config(arch="llama", **lora):
    model = TINY_MODELS[arch] | {"vocab_size": 97}
    if lora:
        model["lora"] = lora
    return build_config({"model": model, "train": {"seed": 3}})


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_adapter_leaves_logits_unchanged(arch):
    ids = torch.randint(0, 97, (2, 16))
    plain = config(arch)
    ref = logits(parallelize(build_model(plain.model, meta=True), plain, None).eval(), ids)
    cfg = config(arch, rank=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = parallelize(build_model(cfg.model, meta=True), cfg, None).eval()
    names = [n for n, _ in model.named_parameters() if "lora" in n]
    assert len(names) == 2 * 6 * cfg.model.num_layers
    assert not any(p.is_meta for p in model.parameters())
    assert model.layers[0].attn.q_proj.lora_A.abs().sum() > 0  # A random, B zero
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=0)


def test_adapters_on_a_real_model_are_filled_and_seeded():
    cfg = config(rank=2)
    a = parallelize(build_transformer(cfg.model, seed=1), cfg, None)
    b = parallelize(build_transformer(cfg.model, seed=2), cfg, None)
    want = adapter_init("layers.1.attn.v_proj.lora_A", (2, 64), seed=3)
    torch.testing.assert_close(a.layers[1].attn.v_proj.lora_A.detach(), want)
    torch.testing.assert_close(b.layers[1].attn.v_proj.lora_A.detach(), want)  # a function of (seed, name) only
    assert want.abs().max() <= 1 / 64 ** 0.5


def test_only_adapters_get_gradients_and_optimizer_groups():
    cfg = config(rank=4, alpha=8, dropout=0.1)
    model = parallelize(build_model(cfg.model, meta=True), cfg, None).train()
    ids = torch.randint(0, 97, (2, 16))
    model(ids).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if "lora" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    grouped = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for n, p in model.named_parameters() if "lora" in n}
    assert trainable_count(model) == sum(p.numel() for n, p in model.named_parameters() if "lora" in n)
    # B was zero, so only B moves on the first step: A's gradient is B^T(...) = 0
    assert model.layers[0].attn.q_proj.lora_A.grad.abs().max() == 0
    assert model.layers[0].attn.q_proj.lora_B.grad.abs().max() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_state_gives_the_lora_logits(arch):
    cfg = config(arch, rank=3, alpha=6, targets=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = parallelize(build_model(cfg.model, meta=True), cfg, None).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    ids = torch.randint(0, 97, (2, 16))
    want = logits(model, ids)
    merged = merge_lora_state({k: v.detach() for k, v in model.state_dict().items()}, cfg.model.lora)
    assert not any("lora" in k for k in merged)
    plain = config(arch)
    base = build_model(plain.model)
    base.load_state_dict(merged)
    got = logits(base.eval(), ids)
    assert (got - logits(parallelize(build_model(plain.model, meta=True), plain, None).eval(), ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_config_errors():
    cfg = config("gpt2", rank=2, targets=["q_proj", "gate_proj"])
    with pytest.raises(ConfigError, match="model.lora.targets names gate_proj but this gpt2 model has none"):
        parallelize(build_model(cfg.model, meta=True), cfg, None)
    with pytest.raises(ValueError, match="targets is empty"):
        config(rank=2, targets=[])
    with pytest.raises(ValueError, match="needs a Transformer"):
        build_config({"model": {"arch": "resnet", "lora": {"rank": 2}}})


def freeze(patterns, arch="llama"):
    cfg = build_config({"model": TINY_MODELS[arch] | {"vocab_size": 97}, "train": {"freeze": patterns}})
    model = parallelize(build_model(cfg.model, meta=True), cfg, None)
    return {n for n, p in model.named_parameters() if not p.requires_grad}, model


def test_freeze_patterns():
    frozen, model = freeze(["embeddings", "layers.<1"])
    assert "embed.wte.weight" in frozen and "head.lm_head.weight" not in frozen
    assert all(n.startswith(("embed.", "layers.0.")) for n in frozen)
    assert any(n.startswith("layers.0.") for n in frozen) and not any(n.startswith("layers.1.") for n in frozen)
    assert [p for g in param_groups(model, 0.1) for p in g["params"]] and \
        all(p.requires_grad for g in param_groups(model, 0.1) for p in g["params"])
    frozen, _ = freeze(["*.attn_norm.*", "layers.1.mlp.*"])
    assert frozen == {"layers.0.attn_norm.weight", "layers.1.attn_norm.weight", "layers.1.mlp.gate_proj.weight",
                      "layers.1.mlp.up_proj.weight", "layers.1.mlp.down_proj.weight"}
    frozen, _ = freeze(["embeddings"], arch="gpt2")  # tied: the LM head is the token table
    assert frozen == {"embed.wte.weight", "embed.wpe.weight"}


def test_freeze_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"train.freeze: pattern 'layer.0.\*' matches no parameter"):
        freeze(["layer.0.*"])
    with pytest.raises(ConfigError, match="model.num_layers=2"):
        freeze(["layers.<3"])
    with pytest.raises(ConfigError, match="freezes every trainable parameter"):
        freeze(["*"])
    with pytest.raises(ValueError, match="layers.<N"):
        freeze(["layers.<x"])


def test_planner_counts_optimizer_state_for_trainable_parameters_only():
    from megatrain.plan import plan_memory
    cfg = config(rank=4, targets=["q_proj", "v_proj", "down_proj"])
    model = parallelize(build_model(cfg.model, meta=True), cfg, None)
    (row,) = plan_memory(cfg, world_size=1)
    assert row.trainable == trainable_count(model) == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4 + 4 * 128 + 64 * 4)
    assert row.params == sum(p.numel() for p in model.parameters())  # untied llama: each tensor once
    assert row.adam == 8 * row.trainable and row.grads == 4 * row.trainable
    (full,) = plan_memory(config(), world_size=1)
    assert full.adam == 8 * full.params and row.weights == 4 * row.params > full.weights
    frozen = build_config({"model": TINY_MODELS["llama"] | {"vocab_size": 97},
                           "train": {"freeze": ["embeddings", "layers.<1"]}})
    (part,) = plan_memory(frozen, world_size=1)
    model = parallelize(build_model(frozen.model, meta=True), frozen, None)
    assert part.trainable == trainable_count(model) < part.params == full.params


def test_activation_checkpointing_gives_the_same_adapter_gradients():
    grads = []
    ids = torch.randint(0, 97, (2, 16))
    for mode in ("none", "every"):
        cfg = config(rank=4, targets=["q_proj", "o_proj", "gate_proj", "down_proj"])
        cfg.parallel.activation_checkpointing = mode
        model = parallelize(build_model(cfg.model, meta=True), cfg, None).train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model(ids).float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
