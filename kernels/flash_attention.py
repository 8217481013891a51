"""Flash attention forward and backward (FlashAttention-2 scheme) with GQA, causal or full.

Forward: one program per (query block, batch·q-head); it streams key/value blocks with an online
softmax in fp32 (exp2 domain) and never forms the T×S score matrix; it saves the per-row log-sum-exp.
Blocks entirely below the causal diagonal and inside the keys run without masks; only the
diagonal/ragged blocks pay for them.
Backward: a small pass computes delta = rowsum(dO·O); one kernel per key block accumulates dK and dV
over all query blocks and, for GQA, over every q head sharing that kv head (so no atomics); a second
kernel per query block accumulates dQ. Scores are recomputed from q, k and the saved LSE.

Causal masking is top-left aligned (query i sees keys j ≤ i), as torch's
``scaled_dot_product_attention(is_causal=True)`` that the reference uses; this matters when T ≠ S.

Per-document masks (packed rows, varlen): ``segments`` (B, T) / ``key_segments`` (B, S) document ids; a query
sees only keys of its own document. Every block loads its ids and their min/max: a key block (forward, dQ) or a
query block (dK/dV) whose id range is disjoint from the program's own is skipped, so packed rows of short
documents cost about Σ doc² instead of T². With ids the running max is guarded (a row may have no key in a
block), and a row with no key at all gets output 0 and LSE +inf (its backward probabilities are then 0).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatrain.ops.attention import attention_reference  # noqa: F401  (the one reference)
from megatrain.triton_kernels._common import check_device, interpreting, next_pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (tf32 would miss the fp32 accuracy bar); 16-bit: tensor cores.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _seg_block(SEG, offs, n, other):
    """Segment ids of one block (int32, ``other`` past ``n``) and their min/max over the valid rows."""
    valid = offs < n
    seg = tl.load(SEG + offs, mask=valid, other=other)
    lo = tl.min(tl.where(valid, seg, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, seg, -2147483647), axis=0)
    return seg, lo, hi


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, K, V, s_kn, s_vn, offs_m, offs_d, start_n, seq_k, head_dim, qk_scale, seg_q, seg_k,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < head_dim)  # (BLOCK_N, BLOCK_D)
    k = tl.load(K + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = _dot(q, tl.trans(k), IEEE) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        keep = offs_n[None, :] < seq_k
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    if HAS_SEG:
        # A query sees only keys of its own document. A row can then have no key in this block (or, with
        # key segments of their own, none at all): the max is taken as 0 there so exp2 never sees -inf - -inf.
        qk = tl.where(seg_q[:, None] == seg_k[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        # Every row keeps key 0 in its first block, so m_new is finite and exp2 never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(V + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit
def _fwd_block_loop(
    acc, l_i, m_i, q, K, V, s_kn, s_vn, offs_m, offs_d, lo, hi, seq_k, head_dim, qk_scale,
    seg_q, q_seg_lo, q_seg_hi, SEG_K,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        if HAS_SEG:
            # skip a key block that holds no key of this query block's documents (its ids' range is disjoint)
            seg_k, k_lo, k_hi = _seg_block(SEG_K, start_n + tl.arange(0, BLOCK_N), seq_k, -1)
            if (k_lo <= q_seg_hi) & (k_hi >= q_seg_lo):
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, s_kn, s_vn, offs_m, offs_d, start_n, seq_k,
                                          head_dim, qk_scale, seg_q, seg_k, MASKED, CAUSAL, HAS_SEG, BLOCK_N, IEEE)
        else:
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, s_kn, s_vn, offs_m, offs_d, start_n, seq_k,
                                      head_dim, qk_scale, seg_q, seg_q, MASKED, CAUSAL, HAS_SEG, BLOCK_N, IEEE)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEG_Q, SEG_K,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_sqb, s_skb,
    n_q_heads, group, seq_q, seq_k, head_dim, qk_scale,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group  # GQA: q heads [hk·group, (hk+1)·group) share kv head hk
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], mask=q_mask, other=0.0)
    K_bh = K + b * s_kb + hk * s_kh
    V_bh = V + b * s_vb + hk * s_vh
    if HAS_SEG:  # (BLOCK_M,) document ids; rows past seq_q get -2, which no key (-1 past seq_k) matches
        seg_q, q_seg_lo, q_seg_hi = _seg_block(SEG_Q + b * s_sqb, offs_m, seq_q, -2)
    else:
        seg_q, q_seg_lo, q_seg_hi = offs_m, 0, 0
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
        # Key blocks wholly left of this block's first query and inside seq_k need no causal/length mask.
        full_end = tl.minimum((start_m + 1) // BLOCK_N, seq_k // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    SEG_K_b = SEG_K + b * s_skb
    acc, l_i, m_i = _fwd_block_loop(acc, l_i, m_i, q, K_bh, V_bh, s_kt, s_vt, offs_m, offs_d, 0, full_end,
                                    seq_k, head_dim, qk_scale, seg_q, q_seg_lo, q_seg_hi, SEG_K_b,
                                    False, CAUSAL, HAS_SEG, BLOCK_N, IEEE)
    acc, l_i, m_i = _fwd_block_loop(acc, l_i, m_i, q, K_bh, V_bh, s_kt, s_vt, offs_m, offs_d, full_end, hi,
                                    seq_k, head_dim, qk_scale, seg_q, q_seg_lo, q_seg_hi, SEG_K_b,
                                    True, CAUSAL, HAS_SEG, BLOCK_N, IEEE)
    if HAS_SEG:
        # A row that sees no key at all (key segments of their own): output 0 and LSE +inf, so that the
        # backward's probabilities exp(s - LSE) are 0 for it (FlashAttention's convention for empty rows).
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    else:
        acc = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log LSE, (BLOCK_M,)
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=q_mask)
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, n_q_heads, seq_q, head_dim,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_q_heads
    h = bh % n_q_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,) = rowsum(dO·O)
    tl.store(DELTA + bh * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, Q_bh, DO_bh, LSE, DELTA, bh, s_qt, s_dt, offs_n, offs_d, start_m, seq_q, seq_k,
                   head_dim, qk_scale, seg_k, seg_q,
                   CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    q = tl.load(Q_bh + offs_m[:, None] * s_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO_bh + offs_m[:, None] * s_dt + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    qk_t = _dot(k, tl.trans(q), IEEE) * qk_scale  # (BLOCK_N, BLOCK_M): scores transposed
    keep = (offs_m[None, :] < seq_q) & (offs_n[:, None] < seq_k)
    if CAUSAL:
        keep = keep & (offs_m[None, :] >= offs_n[:, None])
    if HAS_SEG:
        keep = keep & (seg_q[None, :] == seg_k[:, None])
    p_t = tl.where(keep, tl.math.exp2(qk_t - lse2[None, :]), 0.0)
    dv += _dot(p_t.to(do.dtype), do, IEEE)
    dp_t = _dot(v, tl.trans(do), IEEE)  # (BLOCK_N, BLOCK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEG_Q, SEG_K,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_dkb, s_dkh, s_dkt, s_sqb, s_skb,
    n_q_heads, n_kv_heads, group, seq_q, seq_k, head_dim, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < head_dim)
    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if HAS_SEG:  # (BLOCK_N,) key document ids; keys past seq_k get -1, which no query (-2 past seq_q) matches
        seg_k, k_seg_lo, k_seg_hi = _seg_block(SEG_K + b * s_skb, offs_n, seq_k, -1)
    else:
        seg_k, k_seg_lo, k_seg_hi = offs_n, 0, 0
    SEG_Q_b = SEG_Q + b * s_sqb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Queries before this key block never see it under the causal mask.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_q_heads + h
        Q_bh = Q + b * s_qb + h * s_qh
        DO_bh = DO + b * s_db + h * s_dh
        for start_m in range(lo, seq_q, BLOCK_M):
            if HAS_SEG:  # skip a query block with none of this key block's documents
                seg_q, q_seg_lo, q_seg_hi = _seg_block(SEG_Q_b, start_m + tl.arange(0, BLOCK_M), seq_q, -2)
                if (k_seg_lo <= q_seg_hi) & (k_seg_hi >= q_seg_lo):
                    dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q_bh, DO_bh, LSE, DELTA, bh, s_qt, s_dt, offs_n, offs_d,
                                            start_m, seq_q, seq_k, head_dim, qk_scale, seg_k, seg_q,
                                            CAUSAL, HAS_SEG, BLOCK_M, IEEE)
            else:
                dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q_bh, DO_bh, LSE, DELTA, bh, s_qt, s_dt, offs_n, offs_d,
                                        start_m, seq_q, seq_k, head_dim, qk_scale, seg_k, seg_k,
                                        CAUSAL, HAS_SEG, BLOCK_M, IEEE)
    out = offs_n[:, None] * s_dkt + offs_d[None, :]
    base = b * s_dkb + hk * s_dkh
    tl.store(DK + base + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_step(dq, q, do, lse2, delta, K_bh, V_bh, s_kt, s_vt, offs_m, offs_d, start_n, seq_q, seq_k, head_dim,
                 qk_scale, seg_q, seg_k,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < head_dim)
    k = tl.load(K_bh + offs_n[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_bh + offs_n[:, None] * s_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = _dot(q, tl.trans(k), IEEE) * qk_scale  # (BLOCK_M, BLOCK_N)
    keep = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if HAS_SEG:
        keep = keep & (seg_q[:, None] == seg_k[None, :])
    p = tl.where(keep, tl.math.exp2(qk - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEG_Q, SEG_K,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_dqb, s_dqh, s_dqt, s_sqb, s_skb,
    n_q_heads, group, seq_q, seq_k, head_dim, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    K_bh = K + b * s_kb + hk * s_kh
    V_bh = V + b * s_vb + hk * s_vh
    if HAS_SEG:
        seg_q, q_seg_lo, q_seg_hi = _seg_block(SEG_Q + b * s_sqb, offs_m, seq_q, -2)
    else:
        seg_q, q_seg_lo, q_seg_hi = offs_m, 0, 0
    SEG_K_b = SEG_K + b * s_skb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
    else:
        hi = seq_k
    for start_n in range(0, hi, BLOCK_N):
        if HAS_SEG:
            seg_k, k_seg_lo, k_seg_hi = _seg_block(SEG_K_b, start_n + tl.arange(0, BLOCK_N), seq_k, -1)
            if (k_seg_lo <= q_seg_hi) & (k_seg_hi >= q_seg_lo):
                dq = _bwd_dq_step(dq, q, do, lse2, delta, K_bh, V_bh, s_kt, s_vt, offs_m, offs_d, start_n, seq_q,
                                  seq_k, head_dim, qk_scale, seg_q, seg_k, CAUSAL, HAS_SEG, BLOCK_N, IEEE)
        else:
            dq = _bwd_dq_step(dq, q, do, lse2, delta, K_bh, V_bh, s_kt, s_vt, offs_m, offs_d, start_n, seq_q,
                              seq_k, head_dim, qk_scale, seg_q, seg_q, CAUSAL, HAS_SEG, BLOCK_N, IEEE)
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---- host side -------------------------------------------------------------------------------------------

def _check(q, k, v) -> None:
    check_device("attention", q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    head_dim = q.shape[3]
    if head_dim % 16 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {head_dim} must be a multiple of 16 and ≤ {MAX_HEAD_DIM} for the "
                         "triton kernel; use model.kernel_overrides.attention=torch")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")


def _segment_ids(q, k, segments, key_segments):
    """(B, T) and (B, S) int32 contiguous document ids, or (None, None). ``key_segments`` defaults to
    ``segments``, which then needs T = S (self-attention over one packed row)."""
    if segments is None:
        if key_segments is not None:
            raise ValueError("attention: key_segments without segments; pass the queries' segments too")
        return None, None
    if key_segments is None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"attention: segments without key_segments need T = S, got T={q.shape[2]}, "
                             f"S={k.shape[2]}; pass key_segments (B, S)")
        key_segments = segments
    for name, seg, n in (("segments", segments, q.shape[2]), ("key_segments", key_segments, k.shape[2])):
        if seg.shape != (q.shape[0], n) or seg.is_floating_point() or seg.is_complex():
            raise ValueError(f"attention: {name} must be integer document ids shaped ({q.shape[0]}, {n}), got "
                             f"{seg.dtype} {tuple(seg.shape)}")
        if seg.device != q.device:
            raise ValueError(f"attention: {name} is on {seg.device}, q on {q.device}; move them to one device")
    seg_q = segments.to(torch.int32).contiguous()
    seg_k = seg_q if key_segments is segments else key_segments.to(torch.int32).contiguous()
    return seg_q, seg_k


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segments: torch.Tensor | None = None,
             key_segments: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes these inputs (the dispatcher falls back to torch otherwise)."""
    try:
        _check(q, k, v)
        _segment_ids(q, k, segments, key_segments)
    except ValueError:
        return False
    return True


def _blocks(head_dim: int, *, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Heuristic, not tuned on hardware yet."""
    if interpreting():
        return 16, 16, 4, 1
    if backward:
        return (32, 64, 4, 2) if head_dim <= 64 else (32, 64, 8, 2) if head_dim <= 128 else (16, 32, 8, 1)
    return (128, 64, 4, 3) if head_dim <= 64 else (128, 64, 8, 3) if head_dim <= 128 else (64, 32, 8, 2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def flash_attention_forward(q, k, v, *, causal: bool = True, softmax_scale: float | None = None,
                            block_m: int | None = None, block_n: int | None = None, segments=None, key_segments=None):
    """Host launcher. q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (o (B, Hq, T, D), lse (B, Hq, T) fp32, natural log).
    ``segments`` (B, T) / ``key_segments`` (B, S; default ``segments``): document ids; a query attends only to
    keys of its own document. A row that sees no key gets output 0 and LSE +inf."""
    _check(q, k, v)
    seg_q, seg_k = _segment_ids(q, k, segments, key_segments)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, n_q_heads, seq_q, head_dim = q.shape
    n_kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, n_q_heads, seq_q), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = _blocks(head_dim, backward=False)
    bm, bn = block_m or bm, block_n or bn
    if o.numel() == 0:
        return o, lse
    if seq_k == 0:
        raise ValueError("attention: k and v have no positions (S = 0); every query needs at least one key")
    grid = (triton.cdiv(seq_q, bm), batch * n_q_heads)
    has_seg = seg_q is not None
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, seg_q if has_seg else lse, seg_k if has_seg else lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        seg_q.stride(0) if has_seg else 0, seg_k.stride(0) if has_seg else 0,
        n_q_heads, n_q_heads // n_kv_heads, seq_q, seq_k, head_dim, scale * LOG2E,
        CAUSAL=causal, HAS_SEG=has_seg, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, next_pow2(head_dim)),
        IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, *, causal: bool = True, softmax_scale: float | None = None,
                             block_m: int | None = None, block_n: int | None = None, segments=None,
                             key_segments=None):
    """Host launcher. Returns (dq, dk, dv) shaped like q, k, v; dK/dV summed over each GQA group.
    ``segments`` / ``key_segments``: as given to the forward."""
    do = _unit_last(do)
    seg_q, seg_k = _segment_ids(q, k, segments, key_segments)
    has_seg = seg_q is not None
    seg_args = (seg_q, seg_k) if has_seg else (lse, lse)  # never read without segments
    seg_strides = (seg_q.stride(0), seg_k.stride(0)) if has_seg else (0, 0)
    batch, n_q_heads, seq_q, head_dim = q.shape
    n_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    block_d = max(16, next_pow2(head_dim))
    bm, bn, warps, stages = _blocks(head_dim, backward=True)
    bm, bn = block_m or bm, block_n or bn
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    delta = torch.empty((batch, n_q_heads, seq_q), device=q.device, dtype=torch.float32)
    ieee = q.dtype == torch.float32
    if seq_q:
        _attn_bwd_delta_kernel[(triton.cdiv(seq_q, bm), batch * n_q_heads)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], n_q_heads, seq_q, head_dim,
            BLOCK_M=bm, BLOCK_D=block_d, num_warps=4)
    if seq_k:
        _attn_bwd_dkdv_kernel[(triton.cdiv(seq_k, bn), batch * n_kv_heads)](
            q, k, v, do, lse, delta, dk, dv, *seg_args,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *seg_strides,
            n_q_heads, n_kv_heads, group, seq_q, seq_k, head_dim, scale * LOG2E, scale,
            CAUSAL=causal, HAS_SEG=has_seg, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, IEEE=ieee, num_warps=warps, num_stages=stages)
    if seq_q:
        _attn_bwd_dq_kernel[(triton.cdiv(seq_q, bn), batch * n_q_heads)](
            q, k, v, do, lse, delta, dq, *seg_args,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *seg_strides,
            n_q_heads, group, seq_q, seq_k, head_dim, scale * LOG2E, scale,
            CAUSAL=causal, HAS_SEG=has_seg, BLOCK_M=bn, BLOCK_N=bm, BLOCK_D=block_d, IEEE=ieee, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, block_m, block_n, segments, key_segments):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = flash_attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                         block_m=block_m, block_n=block_n, segments=segments,
                                         key_segments=key_segments)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.segments = (segments, key_segments)  # integer ids: no gradient, kept as they are
        ctx.causal, ctx.softmax_scale, ctx.blocks = causal, softmax_scale, (block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        block_m, block_n = ctx.blocks
        segments, key_segments = ctx.segments
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, causal=ctx.causal,
                                              softmax_scale=ctx.softmax_scale, block_m=block_m, block_n=block_n,
                                              segments=segments, key_segments=key_segments)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
              segments: torch.Tensor | None = None, key_segments: torch.Tensor | None = None,
              softmax_scale: float | None = None, block_m: int | None = None,
              block_n: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale [+ causal mask] [+ document mask]) v with GQA. q (B, Hq, T, D), k/v (B, Hkv, S, D),
    Hq % Hkv == 0; D a multiple of 16 up to 256; scale defaults to 1/√D. Returns (B, Hq, T, D) in q's dtype.
    ``segments`` (B, T) and ``key_segments`` (B, S; default ``segments``, then T = S): integer document ids of
    each query and key; a query attends only to keys of its own document (packed rows, varlen attention).
    ``block_m``/``block_n`` override the tile sizes (tests, tuning)."""
    return FlashAttentionFunction.apply(q, k, v, causal, softmax_scale, block_m, block_n, segments, key_segments)
