"""Rotary position embeddings (rotate-half convention, as HF Llama): cache, dispatch, reference."""
from __future__ import annotations

import math

import torch

from megatrain.ops.dispatch import backend_for, provider, register
from megatrain.errors import UserError

register("rope", "triton", "megatrain.triton_kernels.rope")


def rope_cache(
    seq_len: int, head_dim: int, *, theta: float = 10000.0, scaling: dict | None = None,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim). ``scaling`` follows HF's ``rope_scaling`` (linear, llama3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (D/2,)
    inv_freq = _scale_inv_freq(inv_freq, scaling)
    pos = torch.arange(seq_len, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise UserError(f"model.rope_scaling: type {kind!r} is not supported; use linear or llama3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: (B, Hq, T, D), k: (B, Hkv, T, D), cos/sin: (T, D)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False):
    """Rotated (q, k). ``inplace=True`` lets the triton backend overwrite q and k (saves two activations);
    other backends ignore it, so always use the returned tensors."""
    backend = backend_for("rope", q.device, dtype=q.dtype, shape={"head_dim": q.shape[-1]})
    if backend == "triton":
        return provider("rope", backend)(q, k, cos, sin, inplace=inplace)
    if backend != "torch":
        return provider("rope", backend)(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
