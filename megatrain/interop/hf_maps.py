"""Weight and config maps between Hugging Face GPT-2 / Llama and megatrain's Transformer.

Each megatrain tensor is described as a function of one HF tensor (``from_hf``), and each HF tensor as a
function of megatrain tensors (``to_hf``), so a loader can read only the HF tensors a rank needs.
GPT-2 stores projections as Conv1D (in, out) — transposed against nn.Linear — and fuses q|k|v in c_attn.
"""
from __future__ import annotations

from typing import Callable

import torch

from megatrain.config.schema import ModelConfig
from megatrain.errors import CheckpointError

Tensor = torch.Tensor


def model_fields_from_hf(hf: dict) -> dict:
    """ModelConfig fields from an HF ``config.json`` dict (gpt2 or llama)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return dict(arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
                    num_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                    max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind == "llama":
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise CheckpointError("HF Llama config with attention_bias/mlp_bias=true is not supported by megatrain's llama")
        return dict(arch="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                    num_layers=hf["num_hidden_layers"], num_heads=heads,
                    num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
                    max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                    rope_theta=hf.get("rope_theta", 10000.0), rope_scaling=hf.get("rope_scaling"),
                    tie_embeddings=hf.get("tie_word_embeddings", False),
                    head_dim=head_dim if head_dim not in (None, hf["hidden_size"] // heads) else None)
    raise CheckpointError(f"HF model_type={kind!r} is not supported; megatrain maps gpt2 and llama")


def hf_config_from_model(cfg: ModelConfig) -> dict:
    if cfg.arch == "gpt2":
        if cfg.attn_head_dim * cfg.num_heads != cfg.hidden_size:
            raise CheckpointError(f"model.head_dim={cfg.head_dim}: Hugging Face GPT-2 needs num_heads*head_dim == hidden_size "
                             "(heads were pruned); keep the megatrain checkpoint or prune MLP/depth only")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                    n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                    tie_word_embeddings=cfg.tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if cfg.arch == "llama":
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_size,
                    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                    rope_scaling=cfg.rope_scaling, tie_word_embeddings=cfg.tied, hidden_act="silu",
                    attention_bias=False, mlp_bias=False, head_dim=cfg.attn_head_dim)
    raise CheckpointError(f"model.arch={cfg.arch} has no Hugging Face equivalent; export supports gpt2 and llama")


def from_hf_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable[[Tensor], Tensor]]]:
    """megatrain name → (HF name, function of that HF tensor giving the megatrain tensor)."""
    def ident(t):
        return t
    ident.identity = True  # a loader may read row slices of such tensors directly
    m: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {}
    if cfg.arch == "gpt2":
        h = cfg.hidden_size
        m["embed.wte.weight"] = ("transformer.wte.weight", ident)
        m["embed.wpe.weight"] = ("transformer.wpe.weight", ident)
        for i in range(cfg.num_layers):
            p, o = f"transformer.h.{i}.", f"layers.{i}."
            for j, name in enumerate(("q", "k", "v")):
                sl = slice(j * h, (j + 1) * h)
                m[f"{o}attn.{name}_proj.weight"] = (p + "attn.c_attn.weight", lambda t, sl=sl: t[:, sl].t())
                m[f"{o}attn.{name}_proj.bias"] = (p + "attn.c_attn.bias", lambda t, sl=sl: t[sl])
            m[o + "attn.o_proj.weight"] = (p + "attn.c_proj.weight", lambda t: t.t())
            m[o + "attn.o_proj.bias"] = (p + "attn.c_proj.bias", ident)
            m[o + "mlp.up_proj.weight"] = (p + "mlp.c_fc.weight", lambda t: t.t())
            m[o + "mlp.up_proj.bias"] = (p + "mlp.c_fc.bias", ident)
            m[o + "mlp.down_proj.weight"] = (p + "mlp.c_proj.weight", lambda t: t.t())
            m[o + "mlp.down_proj.bias"] = (p + "mlp.c_proj.bias", ident)
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                m[f"{o}{ours}.weight"] = (f"{p}{theirs}.weight", ident)
                m[f"{o}{ours}.bias"] = (f"{p}{theirs}.bias", ident)
        m["head.norm.weight"] = ("transformer.ln_f.weight", ident)
        m["head.norm.bias"] = ("transformer.ln_f.bias", ident)
        if not cfg.tied:
            m["head.lm_head.weight"] = ("lm_head.weight", ident)
        return m
    if cfg.arch == "llama":
        m["embed.wte.weight"] = ("model.embed_tokens.weight", ident)
        for i in range(cfg.num_layers):
            p, o = f"model.layers.{i}.", f"layers.{i}."
            for name in ("q", "k", "v", "o"):
                m[f"{o}attn.{name}_proj.weight"] = (f"{p}self_attn.{name}_proj.weight", ident)
            for name in ("gate", "up", "down"):
                m[f"{o}mlp.{name}_proj.weight"] = (f"{p}mlp.{name}_proj.weight", ident)
            m[o + "attn_norm.weight"] = (p + "input_layernorm.weight", ident)
            m[o + "mlp_norm.weight"] = (p + "post_attention_layernorm.weight", ident)
        m["head.norm.weight"] = ("model.norm.weight", ident)
        if not cfg.tied:
            m["head.lm_head.weight"] = ("lm_head.weight", ident)
        return m
    raise CheckpointError(f"model.arch={cfg.arch} has no Hugging Face weight map")


def to_hf_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full megatrain state dict → HF state dict (contiguous tensors, ready for safetensors)."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, Tensor]] = {}
    names = ("q", "k", "v")
    for ours, (theirs, _) in from_hf_map(cfg).items():
        t = state[ours]
        if cfg.arch == "gpt2" and ".c_attn." in theirs:
            j = names.index(ours.split(".")[-2][0])
            fused.setdefault(theirs, {})[j] = t.t() if t.dim() == 2 else t
            continue
        out[theirs] = t.t() if (cfg.arch == "gpt2" and t.dim() == 2 and ".h." in theirs) else t
    for theirs, parts in fused.items():
        out[theirs] = torch.cat([parts[j] for j in range(3)], dim=-1)
    if cfg.arch == "gpt2":
        out["lm_head.weight"] = state["head.lm_head.weight"]
    elif cfg.tied is False or "lm_head.weight" not in out:
        out["lm_head.weight"] = state["head.lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF state dict → megatrain state dict (full tensors)."""
    out = {}
    for ours, (theirs, fn) in from_hf_map(cfg).items():
        if theirs not in hf_state:
            raise CheckpointError(f"Hugging Face checkpoint lacks tensor {theirs!r} (needed for {ours})")
        out[ours] = fn(hf_state[theirs]).contiguous()
    if cfg.tied:
        out["head.lm_head.weight"] = out["embed.wte.weight"]
    return out
