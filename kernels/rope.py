"""Rotary position embeddings (rotate-half convention, as HF Llama) on q and k in one launch.

Forward can rotate q and k in place (``inplace=True``: no new activations; the backward needs only
cos/sin, never the pre-rotation values, so overwriting them is safe for autograd). Backward applies the
transposed rotation to the incoming gradients out of place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatrain.ops.rope import apply_rope_reference  # noqa: F401  (the one reference)
from megatrain.triton_kernels._common import check_device, next_pow2


@triton.jit
def _rotate_heads(
    IN, OUT, s_ib, s_ih, s_it, s_ob, s_oh, s_ot, b, t, n_heads, half, c1, c2, s1, s2,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    dims = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (heads < n_heads) & (dims < half)
    src = IN + b * s_ib + t * s_it + heads * s_ih + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of [[c1, -s1], [s2, c2]]: dx1 = c1·dy1 + s2·dy2, dx2 = c2·dy2 − s1·dy1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # x·cos + rotate_half(x)·sin with rotate_half(x) = (−x2, x1)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    dst = OUT + b * s_ob + t * s_ot + heads * s_oh + dims
    tl.store(dst, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + half, y2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q_IN, Q_OUT, K_IN, K_OUT, COS, SIN,
    s_qib, s_qih, s_qit, s_qob, s_qoh, s_qot,
    s_kib, s_kih, s_kit, s_kob, s_koh, s_kot,
    s_cb, s_ct,
    seq_len, n_q_heads, n_k_heads, half,
    BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one (batch, position) per program, all heads of q and k
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < half
    cs = COS + b * s_cb + t * s_ct + d
    sn = SIN + b * s_cb + t * s_ct + d
    c1 = tl.load(cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cs + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sn, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sn + half, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q_IN, Q_OUT, s_qib, s_qih, s_qit, s_qob, s_qoh, s_qot, b, t, n_q_heads, half,
                  c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K_IN, K_OUT, s_kib, s_kih, s_kit, s_kob, s_koh, s_kot, b, t, n_k_heads, half,
                  c1, c2, s1, s2, BACKWARD, BLOCK_HK, BLOCK_HALF)


def _check(q, k, cos, sin):
    check_device("rope", q, k, cos, sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, _, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head dim")
    if head_dim % 2:
        raise ValueError(f"rope: head dim {head_dim} must be even")
    if cos.shape != sin.shape or cos.shape[-2:] != (seq_len, head_dim) or cos.dim() not in (2, 3):
        raise ValueError(f"rope: cos/sin must be (T, D) or (B, T, D) = ({seq_len}, {head_dim}), got {tuple(cos.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, batch):
        raise ValueError(f"rope: cos/sin batch {cos.shape[0]} must be 1 or {batch}")


def _launch(q_in, q_out, k_in, k_out, cos, sin, *, backward: bool):
    """One launch over (B·T) programs rotating q and k; ``k_in=None`` rotates q alone."""
    batch, n_q_heads, seq_len, head_dim = q_in.shape
    n_k_heads = 0 if k_in is None else k_in.shape[1]
    if k_in is None:
        k_in = k_out = q_in  # never touched: zero heads mask every access
    cos3 = cos if cos.dim() == 3 else cos.unsqueeze(0)  # (1|B, T, D)
    sin3 = sin if sin.dim() == 3 else sin.unsqueeze(0)
    if cos3.stride(-1) != 1 or sin3.stride() != cos3.stride():
        cos3, sin3 = cos3.contiguous(), sin3.contiguous()
    s_cb = 0 if cos3.shape[0] == 1 else cos3.stride(0)
    n = batch * seq_len
    if n == 0:
        return
    _rope_kernel[(n,)](
        q_in, q_out, k_in, k_out, cos3, sin3,
        q_in.stride(0), q_in.stride(1), q_in.stride(2), q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_in.stride(0), k_in.stride(1), k_in.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        s_cb, cos3.stride(1),
        seq_len, n_q_heads, n_k_heads, head_dim // 2,
        BACKWARD=backward, BLOCK_HQ=next_pow2(n_q_heads), BLOCK_HK=next_pow2(n_k_heads),
        BLOCK_HALF=next_pow2(head_dim // 2), num_warps=4,
    )


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_forward(q, k, cos, sin, *, inplace: bool = False):
    """Host launcher: rotated (q, k); ``k=None`` rotates q alone. ``inplace`` writes into the inputs
    (they need unit stride on D)."""
    _check(q, q if k is None else k, cos, sin)
    if inplace:
        if q.stride(-1) != 1 or (k is not None and k.stride(-1) != 1):
            raise ValueError("rope: inplace needs q and k with unit stride on the head dim; pass inplace=False")
        q_out, k_out = q, k
    else:
        q = _unit_last(q)
        k = None if k is None else _unit_last(k)
        q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        k_out = None if k is None else torch.empty(k.shape, device=k.device, dtype=k.dtype)
    _launch(q, q_out, k, k_out, cos, sin, backward=False)
    return q_out, k_out


def rope_backward(dq, dk, cos, sin):
    """Host launcher: gradients w.r.t. the un-rotated q and k (new tensors); ``dk=None`` for q alone."""
    dq = _unit_last(dq)
    dk = None if dk is None else _unit_last(dk)
    dq_in = torch.empty(dq.shape, device=dq.device, dtype=dq.dtype)
    dk_in = None if dk is None else torch.empty(dk.shape, device=dk.device, dtype=dk.dtype)
    _launch(dq, dq_in, dk, dk_in, cos, sin, backward=True)
    return dq_in, dk_in


class RopeFunction(torch.autograd.Function):
    """Out of place, q and k in one launch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out, k_out = rope_forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = rope_backward(dq, dk, cos, sin)
        return dq_in, dk_in, None, None


class RopeInplaceFunction(torch.autograd.Function):
    """In place on one tensor: autograd forbids a Function that returns two tensors from modifying
    views in place, and q/k are usually views of one fused projection."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        rope_forward(x, None, cos, sin, inplace=True)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        return rope_backward(dx, None, cos, sin)[0], None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False):
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by cos/sin (T, D) or (B, T, D); returns (q, k).

    ``inplace=True`` overwrites q and k (saves two activations; two launches instead of one); it needs
    unit stride on D and inputs autograd lets you modify (not leaves that require grad). cos/sin get
    no gradient."""
    if inplace:
        _check(q, k, cos, sin)
        return RopeInplaceFunction.apply(q, cos, sin), RopeInplaceFunction.apply(k, cos, sin)
    return RopeFunction.apply(q, k, cos, sin)
