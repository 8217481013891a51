"""Architecture pins: shapes, parameter counts by formula, and logits equal to Hugging Face's models."""
import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.interop.hf_maps import from_hf_state, hf_config_from_model
from megatrain.models.transformer import build_transformer, flops_per_token, init_tensor


def gpt2_cfg(**kw):
    base = dict(arch="gpt2", vocab_size=101, hidden_size=48, num_layers=2, num_heads=4, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def llama_cfg(**kw):
    base = dict(arch="llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, max_seq_len=32, norm_eps=1e-6)
    return ModelConfig(**{**base, **kw})


def expected_params(cfg: ModelConfig) -> int:
    h, f, v, L = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.attn_head_dim
    if cfg.arch == "gpt2":
        per_layer = (h * h + h) * 2 + (h * kv + kv) * 2 + (h * f + f) + (f * h + h) + 4 * h
        return v * h + cfg.max_seq_len * h + L * per_layer + 2 * h + (0 if cfg.tied else v * h)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return v * h + L * per_layer + h + (0 if cfg.tied else v * h)


@pytest.mark.parametrize("cfg", [gpt2_cfg(), llama_cfg(), llama_cfg(tie_embeddings=True), gpt2_cfg(tie_embeddings=False)])
def test_shapes_and_param_count(cfg):
    model = build_transformer(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    assert model(ids).shape == (3, 17, cfg.vocab_size)
    assert model.num_params() == expected_params(cfg)


def test_flops_per_token_counts_matmuls():
    cfg = llama_cfg()
    n_matmul = sum(p.numel() for n, p in build_transformer(cfg).named_parameters() if n.endswith("proj.weight"))
    n_matmul += cfg.vocab_size * cfg.hidden_size
    assert flops_per_token(cfg, 16) == 6 * n_matmul + 12 * cfg.num_layers * cfg.hidden_size * 16


def test_init_depends_on_name_only():
    a = build_transformer(llama_cfg(), seed=3)
    b = build_transformer(llama_cfg(), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    w = a.layers[1].attn.k_proj.weight
    assert torch.equal(w, init_tensor("layers.1.attn.k_proj.weight", tuple(w.shape), seed=3, std=0.02, num_layers=2))
    assert not torch.equal(build_transformer(llama_cfg(), seed=4).layers[1].attn.k_proj.weight, w)


def test_gpt_rejects_too_long_input():
    model = build_transformer(gpt2_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _hf_model(cfg):
    transformers = pytest.importorskip("transformers")
    hf_cfg = hf_config_from_model(cfg)
    if cfg.arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
    return model.eval()


@pytest.mark.parametrize("cfg", [gpt2_cfg(), llama_cfg(), llama_cfg(rope_scaling={"rope_type": "linear", "factor": 2.0})],
                         ids=["gpt2", "llama-gqa", "llama-rope-linear"])
def test_logits_equal_hugging_face(cfg):
    torch.manual_seed(0)
    hf = _hf_model(cfg)
    with torch.no_grad():  # random, non-trivial norms so the maps of every tensor matter
        for name, p in hf.named_parameters():
            if "ln" in name or "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model = build_transformer(cfg)
    model.load_state_dict(from_hf_state(hf.state_dict(), cfg))
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert (out - ref).abs().max().item() <= 1e-5
