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


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        window: int | None = None) -> torch.Tensor:
    # q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 (GQA shares each kv head by a group of q heads)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if window is not None and window < k.shape[2]:
        assert causal, "a sliding window is defined here for causal attention"
        t, s = q.shape[2], k.shape[2]
        qi = torch.arange(s - t, s, device=q.device)[:, None]  # queries are the last t positions
        kj = torch.arange(s, device=q.device)[None, :]
        allowed = (kj <= qi) & (kj > qi - window)  # (T, S): itself and the window-1 tokens before it
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, Hq, T, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              window: int | None = None, *, policy=None) -> torch.Tensor:
    """``window``: each query sees at most that many keys, itself included (Mistral's sliding window). The
    fused kernels have no window, so a window shorter than the sequence runs the masked torch reference."""
    if q.shape[1] % k.shape[1] != 0:
        raise UserError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if window is not None and window < k.shape[2]:
        return attention_reference(q, k, v, causal, window)
    backend = backend_for("attention", q.device, dtype=q.dtype, shape={"head_dim": q.shape[-1], "causal": causal},
                          policy=policy)
    if backend == "triton" and q.dtype == torch.float32 and q.is_cuda:
        # never the IEEE fp32 Triton path on a GPU, even when asked for: SDPA is several times faster there
        if ("fp32",) not in _warned:
            _warned.add(("fp32",))
            warnings.warn("attention: fp32 inputs run SDPA, not the triton kernel (its fp32 path uses IEEE dots); "
                          "train in bf16 to use the kernel", stacklevel=2)
        return attention_reference(q, k, v, causal)
    if backend == "triton":
        kernel = importlib.import_module(_TRITON_ATTENTION)
        if kernel.supports(q, k, v):
            return kernel.attention(q, k, v, causal)
        key = (q.shape[-1], q.dtype)
        if key not in _warned:  # once per (head dim, dtype): a clear note, not a log flood
            _warned.add(key)
            warnings.warn(f"attention: the triton kernel takes head dims that are multiples of 16 up to 256 in "
                          f"fp16/bf16/fp32; head dim {q.shape[-1]} ({q.dtype}) runs the torch reference", stacklevel=2)
        return attention_reference(q, k, v, causal)
    if backend != "torch":
        return provider("attention", backend)(q, k, v, causal)
    return attention_reference(q, k, v, causal)
