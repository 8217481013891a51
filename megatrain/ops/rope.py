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
    """cos, sin of shape (seq_len, head_dim). ``scaling`` follows HF's ``rope_scaling`` / ``rope_parameters``
    (linear, llama3, yarn)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (D/2,)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "yarn":
        inv_freq, mult = _yarn(theta, head_dim, scaling)
    else:
        inv_freq, mult = _scale_inv_freq(inv_freq, scaling), 1.0
    pos = torch.arange(seq_len, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return ((emb.cos() * mult).to(device=device, dtype=dtype), (emb.sin() * mult).to(device=device, dtype=dtype))


def _yarn(theta: float, dim: int, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: a linear ramp between interpolated and extrapolated
    frequencies over the correction range, and cos/sin scaled by the attention factor."""
    factor, old_ctx = float(s["factor"]), float(s["original_max_position_embeddings"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    att = s.get("attention_factor")
    if att is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot):
        return dim * math.log(old_ctx / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp
    # float32 like transformers: its yarn frequencies are computed in fp32, and fp64 differs by ~1e-7 per angle
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv.double(), float(att)


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
    raise UserError(f"model.rope_scaling: type {kind!r} is not supported; use linear, llama3 or yarn")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: (B, Hq, T, D), k: (B, Hkv, T, D), cos/sin: (T, D), or (B, 1, T, D) gathered at per-token positions
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False,
               policy=None):
    """Rotated (q, k). ``inplace=True`` lets the triton backend overwrite q and k (saves two activations);
    other backends ignore it, so always use the returned tensors. Per-token tables (B, 1, T, D) (packed
    documents, decoding after a cache) run the reference: the fused kernels index a (T, D) table."""
    if cos.dim() != 2:
        return apply_rope_reference(q, k, cos, sin)
    backend = backend_for("rope", q.device, dtype=q.dtype, shape={"head_dim": q.shape[-1]}, policy=policy)
    if backend == "triton":
        return provider("rope", backend)(q, k, cos, sin, inplace=inplace)
    if backend != "torch":
        return provider("rope", backend)(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
