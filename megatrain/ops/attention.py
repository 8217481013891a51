"""Scaled dot-product attention with GQA: dispatch + plain-torch reference."""
from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F

from megatrain.ops.dispatch import backend_for, provider, register
from megatrain.errors import UserError

_TRITON_ATTENTION = "megatrain.triton_kernels.flash_attention"
register("attention", "triton", _TRITON_ATTENTION)
_warned: set[tuple] = set()


def attention_mask(t: int, s: int, *, causal: bool, window: int | None, segments: torch.Tensor | None,
                   key_segments: torch.Tensor | None, q_offset: int | None, device) -> torch.Tensor | None:
    """Boolean (T, S) or (B, 1, T, S) mask, True = may attend; None when SDPA's own causal flag is exact.

    Query i sits at key position ``q_offset + i``: a KV cache passes the number of cached tokens. None is
    SDPA's (and the fused kernel's) top-left convention, offset 0. ``segments`` (B, T) and ``key_segments``
    (B, S; default ``segments``): a query sees only keys of its own segment (document)."""
    if segments is None and (window is None or window >= s) and not q_offset:
        return None
    offset = q_offset or 0
    qi = torch.arange(offset, offset + t, device=device)[:, None]
    kj = torch.arange(s, device=device)[None, :]
    allowed = (kj <= qi) if causal else torch.ones(t, s, dtype=torch.bool, device=device)  # (T, S)
    if window is not None and window < s:
        assert causal, "a sliding window is defined here for causal attention"
        allowed = allowed & (kj > qi - window)  # itself and the window-1 tokens before it
    if segments is not None:
        keys = segments if key_segments is None else key_segments  # (B, S)
        allowed = allowed & (segments[:, None, :, None] == keys[:, None, None, :])  # (B, 1, T, S)
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        window: int | None = None, *, segments: torch.Tensor | None = None,
                        key_segments: torch.Tensor | None = None, q_offset: int | None = None) -> torch.Tensor:
    # q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 (GQA shares each kv head by a group of q heads)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, window=window, segments=segments,
                          key_segments=key_segments, q_offset=q_offset, device=q.device)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, Hq, T, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              window: int | None = None, *, segments: torch.Tensor | None = None,
              key_segments: torch.Tensor | None = None, q_offset: int | None = None, policy=None) -> torch.Tensor:
    """``window``: each query sees at most that many keys, itself included (Mistral's sliding window).
    ``segments`` (B, T) / ``key_segments`` (B, S): document ids (packing, padded decoding); attention stays
    inside a document. ``q_offset``: the first query's key position (tokens already in a KV cache). The triton
    kernel takes segments (per-document masks in its inner loop); a window or a q_offset runs the torch reference."""
    if q.shape[1] % k.shape[1] != 0:
        raise UserError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if (window is not None and window < k.shape[2]) or q_offset:
        return attention_reference(q, k, v, causal, window, segments=segments, key_segments=key_segments,
                                   q_offset=q_offset)
    masks = {"segments": segments, "key_segments": key_segments} if segments is not None else {}
    backend = backend_for("attention", q.device, dtype=q.dtype, shape={"head_dim": q.shape[-1], "causal": causal},
                          policy=policy)
    if backend == "triton" and q.dtype == torch.float32 and q.is_cuda:
        # never the IEEE fp32 Triton path on a GPU, even when asked for: SDPA is several times faster there
        if ("fp32",) not in _warned:
            _warned.add(("fp32",))
            warnings.warn("attention: fp32 inputs run SDPA, not the triton kernel (its fp32 path uses IEEE dots); "
                          "train in bf16 to use the kernel", stacklevel=2)
        return attention_reference(q, k, v, causal, **masks)
    if backend == "triton":
        kernel = importlib.import_module(_TRITON_ATTENTION)
        if kernel.supports(q, k, v, **masks):
            return kernel.attention(q, k, v, causal, **masks)
        key = (q.shape[-1], q.dtype)
        if key not in _warned:  # once per (head dim, dtype): a clear note, not a log flood
            _warned.add(key)
            warnings.warn(f"attention: the triton kernel takes head dims that are multiples of 16 up to 256 in "
                          f"fp16/bf16/fp32 (and segments (B, T) with T = S or key_segments (B, S)); head dim "
                          f"{q.shape[-1]} ({q.dtype}) runs the torch reference", stacklevel=2)
        return attention_reference(q, k, v, causal, **masks)
    if backend != "torch" and not masks:  # other providers take no document masks
        return provider("attention", backend)(q, k, v, causal)
    return attention_reference(q, k, v, causal, **masks)
