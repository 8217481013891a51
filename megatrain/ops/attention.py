"""Scaled dot-product attention with GQA: dispatch + plain-torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatrain.ops.dispatch import backend_for, provider, register

register("attention", "triton", "megatrain.triton_kernels.flash_attention")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    # q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 (GQA shares each kv head by a group of q heads)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, Hq, T, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    backend = backend_for("attention", q.device)
    if backend != "torch":
        return provider("attention", backend)(q, k, v, causal)
    return attention_reference(q, k, v, causal)
