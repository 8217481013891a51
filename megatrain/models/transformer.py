"""Decoder-only Transformer in two block styles, pure torch, unsharded.

- gpt2:  learned positions, LayerNorm (with bias), GELU (tanh) MLP, biases everywhere, tied embeddings.
- llama: RoPE, RMSNorm, SwiGLU MLP, GQA, no biases, untied embeddings.

Options on the llama style cover the Hugging Face families of megatrain/models/registry.py: q/k/v biases
(qwen2), per-head q/k RMSNorm and an explicit head_dim (qwen3), sliding-window attention (mistral), and the
MLP activation (gpt2's activation_function, llama's hidden_act).

The model knows nothing of parallelism, checkpointing or kernels: hot ops go through ``megatrain.ops``
(dispatch picks the kernel), and the tensor-parallel transform swaps the Linear layers for sharded ones.
Head counts are derived from projection shapes at run time, so a sharded projection just works.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megatrain import ops
from megatrain.ops.kernels import DEFAULT_KERNELS
from megatrain.config.schema import ModelConfig
from megatrain.errors import UserError
from megatrain.models.deferred_init import skip_random_init


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama) through the op dispatcher."""

    kernels = DEFAULT_KERNELS  # the run's own, once the kernels transform has run (megatrain.ops.kernels)

    def __init__(self, hidden: int, *, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        if self.kind == "layer":
            return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return self.kernels.rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """RoPE cos/sin table, built lazily per (length, device) so meta-device construction stays cheap."""

    def __init__(self, head_dim: int, *, theta: float, scaling: dict | None, max_positions: int):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_positions = max_positions  # gathered positions index a table this long: no host read of max()
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, D) for positions 0..T-1, or (B, 1, T, D) gathered at ``positions`` (B, T)."""
        need = seq_len if positions is None else max(seq_len, self.max_positions)
        if self._cache is None or self._cache[0] < need or self._cache[1] != device:
            cos, sin = ops.rope_cache(need, self.head_dim, theta=self.theta, scaling=self.scaling, device=device)
            self._cache = (need, device, cos, sin)
        if positions is None:
            return self._cache[2][:seq_len], self._cache[3][:seq_len]  # (T, D) each
        return self._cache[2][positions].unsqueeze(1), self._cache[3][positions].unsqueeze(1)  # (B, 1, T, D)


class Attention(nn.Module):
    kernels = DEFAULT_KERNELS

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        h, d = cfg.hidden_size, cfg.attn_head_dim
        self.head_dim, self.window = d, cfg.sliding_window
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=bias or cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.kv_heads * d, bias=bias or cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.kv_heads * d, bias=bias or cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=bias)
        # one (D,) weight shared by all heads, so a tp shard of the heads keeps it whole
        self.q_norm = Norm(d, kind="rms", eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = Norm(d, kind="rms", eps=cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(d, theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                             max_positions=cfg.max_seq_len) if cfg.arch == "llama" else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """x: (B, T, H). ``positions`` (B, T): RoPE position of each token (None = 0..T-1, or after the cache).
        ``segments`` (B, T): document id of each token; a token attends only within its document (packing).
        ``cache``: this layer's ``LayerCache`` (megatrain.models.kv_cache); keys/values are appended to it."""
        d = self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        b, t = q.shape[:2]  # T from the projection: sequence parallel hands in a sequence shard
        q = q.view(b, t, -1, d).transpose(1, 2)  # (B, Hq, T, D); Hq local under TP
        k = k.view(b, t, -1, d).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, -1, d).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over D, per head
        if self.rotary is not None:
            cos, sin = self.rotary(t, x.device, positions)
            q, k = self.kernels.apply_rope(q, k, cos, sin)
        masks = {}
        if cache is not None:
            masks["q_offset"] = cache.owner.length  # these queries follow the cached keys
            k, v = cache.append(k, v)  # (B, Hkv, S, D): everything cached so far, these tokens last
            masks["key_segments"] = cache.owner.step_key_segments  # built once per forward, not per layer
        if segments is not None:
            masks["segments"] = segments
        y = self.kernels.attention(q, k, v, causal=True, window=self.window, **masks)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, H)


class MLP(nn.Module):
    kernels = DEFAULT_KERNELS

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        self.swiglu = cfg.arch == "llama"
        self.activation = cfg.mlp_activation
        bias = not self.swiglu
        self.gate_proj = nn.Linear(h, f, bias=False) if self.swiglu else None
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        if self.swiglu:
            if self.activation == "silu":
                return self.down_proj(self.kernels.swiglu(self.gate_proj(x), self.up_proj(x)))  # inner (B, T, F)
            return self.down_proj(_ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(_ACTIVATIONS[self.activation](self.up_proj(x)))


_ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = "layer" if cfg.arch == "gpt2" else "rms"
        self.attn_norm = Norm(cfg.hidden_size, kind=kind, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.hidden_size, kind=kind, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:  # (B, T, H); the extras as in Attention.forward
        x = x + self.dropout(self.attn(self.attn_norm(x), positions, segments, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.arch == "gpt2" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.add_positions(self.wte(input_ids), positions)  # (B, T) -> (B, T, H)

    def add_positions(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token vectors (B, T, H) → block input: + learned positions (gpt2), dropout.
        ``positions`` (B, T): each token's position (packed documents restart at 0); None = 0..T-1."""
        if self.wpe is not None:
            t = h.shape[1]
            last = t if positions is None else int(positions.max()) + 1
            if last > self.wpe.num_embeddings:
                raise UserError(f"position {last - 1} exceeds model.max_seq_len="
                                 f"{self.wpe.num_embeddings}; shorten inputs or raise max_seq_len")
            h = h + self.wpe(torch.arange(t, device=h.device) if positions is None else positions)
        return self.dropout(h)


class Head(nn.Module):
    """Final norm + LM projection (weight shared with the token embedding when tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = Norm(cfg.hidden_size, kind="layer" if cfg.arch == "gpt2" else "rms", eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V)
        return self.lm_head(self.norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.is_transformer:
            raise UserError(f"model.arch={cfg.arch} is not a Transformer; use gpt2 or llama")
        if cfg.vocab_size <= 0:
            raise UserError("model.vocab_size is 0; set it or prepare data first so it is read from the tokenizer")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.tied:
            self.head.lm_head.weight = self.embed.wte.weight

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, cache=None, return_hidden: bool = False) -> torch.Tensor:
        """(B, T) -> logits (B, T, V); with ``return_hidden`` the final-normed states (B, T, H) that the LM
        head would project (a fused linear + cross-entropy takes them with ``head.lm_head.weight``).

        ``positions`` / ``segments`` (B, T): packed documents (positions restart, attention stays inside a
        document). ``cache``: a ``KVCache`` for incremental decoding; positions then default to following it."""
        if cache is not None:
            if positions is None:
                positions = cache.positions_for(input_ids.shape[0], input_ids.shape[1], input_ids.device)
            cache.begin(segments)
        h = self.embed(input_ids, positions)
        caches = cache.layers if cache is not None else [None] * len(self.layers)
        extras = positions is not None or segments is not None or cache is not None
        for layer, layer_cache in zip(self.layers, caches):
            # plain calls stay positional-free so per-block transforms (checkpointing, hooks) see one argument
            h = layer(h, positions, segments, layer_cache) if extras else layer(h)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if return_hidden:
            return self.head.norm(h)
        return self.head(h)

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied weight counts once)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if exclude_embeddings:
            n -= self.embed.wte.weight.numel() + (self.embed.wpe.weight.numel() if self.embed.wpe is not None else 0)
        return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM convention: 6·N_matmul + 12·L·H·T.

    N_matmul counts every weight that takes part in a matrix multiply (projections, MLP, LM head),
    so it is exact for the dense work; the attention term counts QKᵀ and AV over the full T×T square
    (causal masking is not subtracted, as in PaLM's MFU)."""
    h, d, L = cfg.hidden_size, cfg.attn_head_dim, cfg.num_layers
    attn = h * cfg.num_heads * d * 2 + h * cfg.kv_heads * d * 2  # q, o, k, v
    mlp = h * cfg.ffn_size * (3 if cfg.arch == "llama" else 2)
    n_matmul = L * (attn + mlp) + h * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * L * cfg.num_heads * d * seq_len


def init_weights(model: nn.Module, *, seed: int, std: float, num_layers: int) -> None:
    """Initialise every parameter from a generator seeded by (seed, parameter name).

    Each tensor depends only on its name, not on construction order or device, so a sharded model can
    recreate the full tensor of any parameter and keep its slice: sharded init == unsharded init, sliced.
    Residual output projections get std/sqrt(2·layers) (GPT-2) so the residual stream's variance stays flat.
    """
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        full = init_tensor(name, tuple(p.shape), seed=seed, std=std, num_layers=num_layers)
        with torch.no_grad():
            p.copy_(full.to(p.dtype))


def init_tensor(name: str, shape: tuple[int, ...], *, seed: int, std: float, num_layers: int) -> torch.Tensor:
    """The initial value of the parameter called ``name`` (full, unsharded shape), on CPU in fp32."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name.rsplit(".", 2)[-2] and leaf == "weight":
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    scale = std / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
    return torch.randn(shape, generator=gen) * scale


def build_transformer(cfg: ModelConfig, *, seed: int = 0, meta: bool = False) -> Transformer:
    """The model initialised from ``seed``; ``meta=True`` builds it without memory (parallelize then
    materialises only this rank's shard, from the same name-seeded init or a checkpoint)."""
    if meta:
        with torch.device("meta"), skip_random_init():
            return Transformer(cfg)
    with skip_random_init():  # init_weights sets every parameter: torch's default fill would be a second init
        model = Transformer(cfg)
    init_weights(model, seed=seed, std=cfg.init_std, num_layers=cfg.num_layers)
    return model
