"""One ModelSpec per Hugging Face architecture family: how to build it, its config and weight translation.

A spec says which megatrain block style (``arch``) a family uses, which ModelConfig fields its config.json
gives (strictly: a field that changes the computation is used or refused in one line naming it), the
config.json written back on export, and the megatrain ⇄ HF tensor-name map. Adding a family is one spec:
interop (import, export, ``--model.from_hf``) looks everything up here.

Column-/row-parallel projections are the same for every family (q/k/v, gate/up column; o, down row), so
``COLUMN`` / ``ROW`` are shared and parallelize/tensor_parallel.py follows them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from megatrain.config.schema import ModelConfig
from megatrain.errors import CheckpointError

Tensor = torch.Tensor
WeightMap = dict[str, tuple[str, Callable[[Tensor], Tensor]]]  # megatrain name → (HF name, fn of that tensor)
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")

# config.json keys that never change the forward pass (bookkeeping, generation defaults, init, dropout —
# training dropout is model.dropout — and ids, which are kept for export).
_HARMLESS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "id2label", "label2id", "tokenizer_class", "task_specific_params", "prefix", "finetuning_task",
    "tf_legacy_loss", "use_bfloat16", "torchscript", "pruned_heads", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "temperature", "top_k",
    "top_p", "num_beams", "repetition_penalty", "attention_dropout", "attn_implementation", "_attn_implementation",
    "_commit_hash", "use_return_dict", "output_router_logits", "pretraining_tp", "max_window_layers",
}


def ident(t: Tensor) -> Tensor:
    return t


ident.identity = True  # a loader may read row slices of such tensors directly


def _t(t: Tensor) -> Tensor:
    return t.t()


@dataclass(frozen=True)
class ModelSpec:
    family: str  # the HF model_type
    arch: str  # megatrain block style: gpt2 | llama
    hf_class: str  # architectures[0] written on export
    fields_from_hf: Callable[[dict, str], dict]  # (config.json, dir) → ModelConfig fields
    hf_config: Callable[[ModelConfig], dict]
    weight_map: Callable[[ModelConfig], WeightMap]
    known_keys: frozenset = field(default_factory=frozenset)  # config.json keys fields_from_hf reads or checks
    extra_tensors: tuple[str, ...] = ()  # HF tensor-name suffixes that are buffers, not weights (ignored)

    def build(self, cfg: ModelConfig, *, seed: int = 0, meta: bool = False):
        from megatrain.models.transformer import build_transformer
        return build_transformer(cfg, seed=seed, meta=meta)

    def check_keys(self, hf: dict, where: str) -> None:
        unknown = sorted(k for k in hf if k not in self.known_keys and k not in _HARMLESS)
        if unknown:
            raise CheckpointError(f"{where}/config.json: field(s) {', '.join(unknown)} of model_type={self.family} are "
                                  "not understood by megatrain and may change the model; remove them if they do not")


def _refuse(where: str, key: str, value, fix: str):
    raise CheckpointError(f"{where}/config.json: {key}={value!r} is not supported; {fix}")


def _get(hf: dict, key: str, default=None):
    value = hf.get(key, default)
    return default if value is None else value


# ----------------------------------------------------------------------------------------------------- rope
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "truncate", "partial_rotary_factor"}


def rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's ``rope_parameters`` or 4.x's top-level ``rope_theta`` /
    ``rope_scaling``. Scaling types megatrain does not compute are refused here, before any data work."""
    params = dict(hf.get("rope_parameters") or {})
    if "default" in params or "full_attention" in params:  # per-layer-type form
        _refuse(where, "rope_parameters", "per layer type", "megatrain uses one RoPE for every layer")
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in (params or legacy).items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    unknown = sorted(set(scaling) - _ROPE_KEYS)
    if unknown:
        _refuse(where, "rope parameters", unknown, "megatrain does not know these RoPE fields")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(where, "partial_rotary_factor", scaling["partial_rotary_factor"], "megatrain rotates the whole head")
    if kind not in ("default", "linear", "llama3", "yarn"):
        _refuse(where, "rope_type", kind, "megatrain computes default, linear, llama3 and yarn RoPE")
    if kind == "default":
        return float(theta), None
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return float(theta), scaling


def _hf_rope(cfg: ModelConfig) -> dict:
    """transformers 5 form; transformers 4.x readers also get the top-level keys."""
    params = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}


# ---------------------------------------------------------------------------------------------------- gpt2
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
             "silu": "silu", "swish": "silu"}


def _gpt2_fields(hf: dict, where: str) -> dict:
    act = _get(hf, "activation_function", "gelu_new")
    if act not in _GPT2_ACT:
        _refuse(where, "activation_function", act, f"use one of {', '.join(_GPT2_ACT)}")
    if not _get(hf, "scale_attn_weights", True):
        _refuse(where, "scale_attn_weights", False, "megatrain scales attention by 1/sqrt(head_dim)")
    if _get(hf, "scale_attn_by_inverse_layer_idx", False):
        _refuse(where, "scale_attn_by_inverse_layer_idx", True, "megatrain does not scale attention per layer")
    if _get(hf, "add_cross_attention", False):
        _refuse(where, "add_cross_attention", True, "megatrain's GPT-2 is decoder-only")
    n_embd = hf["n_embd"]
    return dict(arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=n_embd, num_layers=hf["n_layer"],
                num_heads=hf["n_head"], ffn_hidden_size=_get(hf, "n_inner", 4 * n_embd),
                max_seq_len=hf["n_positions"], norm_eps=_get(hf, "layer_norm_epsilon", 1e-5),
                tie_embeddings=_get(hf, "tie_word_embeddings", True), activation=_GPT2_ACT[act])


def _gpt2_config(cfg: ModelConfig) -> dict:
    if cfg.attn_head_dim * cfg.num_heads != cfg.hidden_size:
        raise CheckpointError(f"model.head_dim={cfg.head_dim}: Hugging Face GPT-2 needs num_heads*head_dim == "
                              "hidden_size (heads were pruned); keep the megatrain checkpoint or prune MLP/depth only")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.mlp_activation]
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                tie_word_embeddings=cfg.tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _gpt2_map(cfg: ModelConfig) -> WeightMap:
    h, m = cfg.hidden_size, {}
    m["embed.wte.weight"] = ("transformer.wte.weight", ident)
    m["embed.wpe.weight"] = ("transformer.wpe.weight", ident)
    for i in range(cfg.num_layers):
        p, o = f"transformer.h.{i}.", f"layers.{i}."
        for j, name in enumerate(("q", "k", "v")):  # Conv1D (in, out) with q|k|v fused along out
            sl = slice(j * h, (j + 1) * h)
            m[f"{o}attn.{name}_proj.weight"] = (p + "attn.c_attn.weight", lambda t, sl=sl: t[:, sl].t())
            m[f"{o}attn.{name}_proj.bias"] = (p + "attn.c_attn.bias", lambda t, sl=sl: t[sl])
        m[o + "attn.o_proj.weight"] = (p + "attn.c_proj.weight", _t)
        m[o + "attn.o_proj.bias"] = (p + "attn.c_proj.bias", ident)
        m[o + "mlp.up_proj.weight"] = (p + "mlp.c_fc.weight", _t)
        m[o + "mlp.up_proj.bias"] = (p + "mlp.c_fc.bias", ident)
        m[o + "mlp.down_proj.weight"] = (p + "mlp.c_proj.weight", _t)
        m[o + "mlp.down_proj.bias"] = (p + "mlp.c_proj.bias", ident)
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            m[f"{o}{ours}.weight"] = (f"{p}{theirs}.weight", ident)
            m[f"{o}{ours}.bias"] = (f"{p}{theirs}.bias", ident)
    m["head.norm.weight"] = ("transformer.ln_f.weight", ident)
    m["head.norm.bias"] = ("transformer.ln_f.bias", ident)
    if not cfg.tied:
        m["head.lm_head.weight"] = ("lm_head.weight", ident)
    return m


# ------------------------------------------------------------------------------------- llama and relatives
_LLAMA_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_new": "gelu_tanh", "relu": "relu"}


def _decoder_fields(hf: dict, where: str, *, family: str, qkv_bias: bool = False, qk_norm: bool = False) -> dict:
    """Fields shared by llama, mistral, qwen2 and qwen3 (RMSNorm, RoPE, gated MLP, GQA)."""
    act = _get(hf, "hidden_act", "silu")
    if act not in _LLAMA_ACT:
        _refuse(where, "hidden_act", act, f"use one of {', '.join(_LLAMA_ACT)}")
    if _get(hf, "mlp_bias", False):
        _refuse(where, "mlp_bias", True, "megatrain's gated MLP has no biases")
    layer_types = hf.get("layer_types") or []
    if family != "mistral" and (_get(hf, "use_sliding_window", False)
                                or any(t != "full_attention" for t in layer_types)):
        _refuse(where, "use_sliding_window/layer_types", "sliding layers",
                f"megatrain runs {family} with full attention in every layer")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = _get(hf, "head_dim", hidden // heads)
    theta, scaling = rope_from_hf(hf, where)
    return dict(arch="llama", family=family, vocab_size=hf["vocab_size"], hidden_size=hidden,
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=_get(hf, "num_key_value_heads", heads), ffn_hidden_size=hf["intermediate_size"],
                max_seq_len=_get(hf, "max_position_embeddings", 2048), norm_eps=_get(hf, "rms_norm_eps", 1e-6),
                rope_theta=theta, rope_scaling=scaling, tie_embeddings=_get(hf, "tie_word_embeddings", False),
                head_dim=head_dim if head_dim != hidden // heads else None, activation=_LLAMA_ACT[act],
                qkv_bias=qkv_bias, qk_norm=qk_norm)


def _llama_fields(hf: dict, where: str) -> dict:
    if _get(hf, "attention_bias", False):
        _refuse(where, "attention_bias", True, "megatrain's llama has no attention biases (qwen2 has q/k/v biases)")
    return _decoder_fields(hf, where, family="llama")


def _mistral_fields(hf: dict, where: str) -> dict:
    return _decoder_fields(hf, where, family="mistral") | {"sliding_window": hf.get("sliding_window")}


def _qwen2_fields(hf: dict, where: str) -> dict:
    if _get(hf, "use_mrope", False):  # Qwen2.5 configs carry use_mrope=false; true is the multimodal RoPE
        _refuse(where, "use_mrope", True, "megatrain computes 1-D RoPE")
    return _decoder_fields(hf, where, family="qwen2", qkv_bias=True)  # Qwen2 always has q/k/v biases


def _qwen3_fields(hf: dict, where: str) -> dict:
    if _get(hf, "attention_bias", False):
        _refuse(where, "attention_bias", True, "megatrain's qwen3 has no attention biases")
    return _decoder_fields(hf, where, family="qwen3", qk_norm=True)


def _decoder_config(cfg: ModelConfig, cls: str) -> dict:
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[cfg.mlp_activation]
    out = dict(model_type=cfg.hf_family, architectures=[cls], vocab_size=cfg.vocab_size,
               hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_size,
               max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tied,
               hidden_act=act, head_dim=cfg.attn_head_dim, **_hf_rope(cfg))
    if cfg.hf_family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if cfg.hf_family == "llama":
        out["mlp_bias"] = False
    if cfg.hf_family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.hf_family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out


def _decoder_map(cfg: ModelConfig) -> WeightMap:
    m: WeightMap = {"embed.wte.weight": ("model.embed_tokens.weight", ident)}
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        for name in ("q", "k", "v", "o"):
            m[f"{o}attn.{name}_proj.weight"] = (f"{p}self_attn.{name}_proj.weight", ident)
        if cfg.qkv_bias:
            for name in ("q", "k", "v"):
                m[f"{o}attn.{name}_proj.bias"] = (f"{p}self_attn.{name}_proj.bias", ident)
        if cfg.qk_norm:
            for name in ("q", "k"):
                m[f"{o}attn.{name}_norm.weight"] = (f"{p}self_attn.{name}_norm.weight", ident)
        for name in ("gate", "up", "down"):
            m[f"{o}mlp.{name}_proj.weight"] = (f"{p}mlp.{name}_proj.weight", ident)
        m[o + "attn_norm.weight"] = (p + "input_layernorm.weight", ident)
        m[o + "mlp_norm.weight"] = (p + "post_attention_layernorm.weight", ident)
    m["head.norm.weight"] = ("model.norm.weight", ident)
    if not cfg.tied:
        m["head.lm_head.weight"] = ("lm_head.weight", ident)
    return m


_DECODER_KEYS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "rope_parameters", "tie_word_embeddings", "head_dim", "hidden_act", "mlp_bias", "layer_types",
                 "use_sliding_window", "sliding_window"}
_GPT2_KEYS = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "layer_norm_epsilon",
              "tie_word_embeddings", "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
              "add_cross_attention", "reorder_and_upcast_attn", "resid_pdrop", "embd_pdrop", "attn_pdrop",
              "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
              "summary_first_dropout", "gradient_checkpointing"}

SPECS: dict[str, ModelSpec] = {s.family: s for s in (
    ModelSpec("gpt2", "gpt2", "GPT2LMHeadModel", _gpt2_fields, _gpt2_config, _gpt2_map, frozenset(_GPT2_KEYS),
              extra_tensors=(".attn.bias", ".attn.masked_bias")),
    ModelSpec("llama", "llama", "LlamaForCausalLM", _llama_fields, lambda c: _decoder_config(c, "LlamaForCausalLM"),
              _decoder_map, frozenset(_DECODER_KEYS | {"attention_bias"}), extra_tensors=(".rotary_emb.inv_freq",)),
    ModelSpec("mistral", "llama", "MistralForCausalLM", _mistral_fields,
              lambda c: _decoder_config(c, "MistralForCausalLM"), _decoder_map, frozenset(_DECODER_KEYS),
              extra_tensors=(".rotary_emb.inv_freq",)),
    ModelSpec("qwen2", "llama", "Qwen2ForCausalLM", _qwen2_fields, lambda c: _decoder_config(c, "Qwen2ForCausalLM"),
              _decoder_map, frozenset(_DECODER_KEYS | {"use_mrope"}), extra_tensors=(".rotary_emb.inv_freq",)),
    ModelSpec("qwen3", "llama", "Qwen3ForCausalLM", _qwen3_fields, lambda c: _decoder_config(c, "Qwen3ForCausalLM"),
              _decoder_map, frozenset(_DECODER_KEYS | {"attention_bias"}), extra_tensors=(".rotary_emb.inv_freq",)),
)}


def spec_for_hf(hf: dict, where: str = "model.from_hf") -> ModelSpec:
    kind = hf.get("model_type")
    if kind not in SPECS:
        raise CheckpointError(f"HF model_type={kind!r} is not supported; megatrain maps {', '.join(SPECS)}")
    return SPECS[kind]


def spec_for(cfg: ModelConfig) -> ModelSpec:
    if cfg.hf_family not in SPECS:
        raise CheckpointError(f"model.arch={cfg.arch} has no Hugging Face equivalent; export supports "
                              f"{', '.join(SPECS)}")
    spec = SPECS[cfg.hf_family]
    if spec.arch != cfg.arch:
        raise CheckpointError(f"model.family={cfg.family} needs model.arch={spec.arch}, not {cfg.arch}")
    return spec


def fields_from_hf(hf: dict, where: str = "model.from_hf") -> dict:
    """ModelConfig fields of an HF ``config.json`` dict; unknown or unsupported fields refused in one line."""
    spec = spec_for_hf(hf, where)
    spec.check_keys(hf, where)
    return spec.fields_from_hf(hf, where)

