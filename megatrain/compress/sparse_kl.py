"""Top-k distillation KL: the teacher as k token log-probabilities plus one tail bucket, full or vocab-parallel.

A precomputed teacher keeps, per position, its k most likely tokens K with log p_i (i ∈ K) at temperature T and
the log of the mass left over, log r = log Σ_{j∉K} p_j. The loss is the KL between teacher and student after
both are coarsened onto the k + 1 outcomes {each token of K, "any other token"}:

    KL_K = Σ_{i∈K} p_i (log p_i − log q_i) + r (log r − log q_tail),  q = softmax(s/T),  q_tail = Σ_{j∉K} q_j

Why a tail bucket and not the teacher renormalised over K: renormalising says the other V − k tokens have
probability zero, so the student is pushed to drain every bit of mass from them (over-confident on the top-k
support, the bias grows as the teacher's tail mass grows); the bucket keeps the teacher's true tail mass as a
target and leaves the shape inside the tail to the student. Coarsening never increases a KL, so KL_K ≤ the full
KL, with equality at k = V (the bucket is empty) or when the student's tail is proportional to the teacher's.

Gradient with respect to the student logits: (q − target) / T with target_i = p_i on K and r·q_j / q_tail off K
(the teacher's tail mass spread in the student's own proportions) — a proper distribution, computed locally.

Vocab-parallel: the student logits are split along the vocabulary over ``group``; each rank picks the selected
logits it owns (masked gather), and one all-reduce of max (2, N) plus one sum all-reduce of (2 + k, N) give
both log-partition functions and all k selected logits. Full logits are never gathered. Columns at or past
``vocab_size`` (tp padding) are masked out of both the partition function and the tail.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def topk_targets(logits: torch.Tensor, *, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) full teacher logits -> top-k ids (N, k) int64, their log-probs at T (N, k) fp32 and the tail's
    log-mass (N,) fp32 (−inf when k = V). The tail is a log-sum-exp over the other tokens, exact in fp32 (not
    1 − Σ top-k, which cancels when the top-k hold nearly all the mass)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    top_logp, top_ids = logp.topk(k, dim=-1)  # (N, k), sorted descending
    tail_logp = logp.scatter(1, top_ids, float("-inf")).logsumexp(-1)  # (N,)
    return top_ids, top_logp, tail_logp


def teacher_log_probs(top_logp: torch.Tensor, tail_logp: torch.Tensor) -> torch.Tensor:
    """(N, k) + (N,) stored log-probs -> (N, k + 1) normalised over the k tokens and the tail. Renormalising
    here absorbs the rounding of fp16 storage (the k + 1 probabilities then sum to exactly 1)."""
    x = torch.cat([top_logp.float(), tail_logp.float().unsqueeze(-1)], dim=-1)  # (N, k + 1)
    return x - x.logsumexp(-1, keepdim=True)


class _SparseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, ids, t_logp, group, vocab_size, temperature):
        # student: (N, Vl) this rank's vocabulary columns (Vl = V without tp); ids: (N, k) global token ids;
        # t_logp: (N, k + 1) teacher log-probs over K and the tail (teacher_log_probs)
        n, vl = student.shape
        k = ids.shape[1]
        start = dist.get_rank(group) * vl if group is not None else 0
        valid = torch.arange(start, start + vl, device=student.device) < vocab_size  # (Vl,)
        z = (student.float() / temperature).masked_fill(~valid, float("-inf"))  # (N, Vl)
        mine = (ids >= start) & (ids < start + vl)  # (N, k): selected tokens this rank owns
        col = torch.where(mine, ids - start, torch.full_like(ids, vl))  # (N, k); vl = a spare column
        in_k = torch.zeros(n, vl + 1, dtype=torch.bool, device=z.device).scatter_(1, col, True)[:, :vl]  # (N, Vl)
        tail = valid & ~in_k  # (N, Vl)
        z_tail = z.masked_fill(~tail, float("-inf"))
        maxes = torch.stack([z.max(-1).values, z_tail.max(-1).values])  # (2, N)
        if group is not None:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(torch.isfinite(maxes), maxes, torch.zeros_like(maxes))  # an empty tail has max −inf
        sums = torch.stack([(z - shift[0, :, None]).exp().sum(-1), (z_tail - shift[1, :, None]).exp().sum(-1)])
        z_sel = torch.where(mine, z.gather(1, col.clamp_max(vl - 1)), torch.zeros_like(t_logp[:, :k]))  # (N, k)
        packed = torch.cat([sums, z_sel.t()])  # (2 + k, N): one all-reduce for partitions and selected logits
        if group is not None:
            dist.all_reduce(packed, group=group)
        lse, lse_tail = shift + packed[:2].log()  # (N,), (N,); lse_tail = −inf when the tail is empty
        log_q_sel = packed[2:].t() - lse[:, None]  # (N, k)
        p = t_logp.exp()  # (N, k + 1)
        kl = (p[:, :k] * (t_logp[:, :k] - log_q_sel)).sum(-1)
        tail_term = p[:, k] * (t_logp[:, k] - (lse_tail - lse))
        kl = kl + torch.where(p[:, k] > 0, tail_term, torch.zeros_like(tail_term))  # 0·log 0 = 0
        ctx.save_for_backward(z, lse, lse_tail, p, col, tail)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl  # (N,) fp32

    @staticmethod
    def backward(ctx, g):
        z, lse, lse_tail, p, col, tail = ctx.saved_tensors
        n, vl = z.shape
        k = col.shape[1]
        q = (z - lse[:, None]).exp()  # (N, Vl); 0 on padding
        # target: p_i on the selected tokens, r·q_j/q_tail = r·exp(z_j − lse_tail) on the tail, 0 on padding
        on_tail = torch.where(tail, p[:, k, None] * (z - lse_tail[:, None]).exp(), torch.zeros_like(z))
        on_k = torch.zeros(n, vl + 1, dtype=z.dtype, device=z.device).scatter_(1, col, p[:, :k])[:, :vl]
        grad = (q - on_tail - on_k) * (g / ctx.temperature)[:, None]  # (N, Vl)
        return grad.to(ctx.dtype), None, None, None, None, None


def sparse_kl(student: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor, *,
              temperature: float, vocab_size: int, group=None) -> torch.Tensor:
    """Per-token KL_K (N,) from student logits (N, V) — or (N, V/tp) vocab shards with ``group`` — and the
    teacher's top-k ids (N, k), log-probs (N, k) and tail log-mass (N,) at ``temperature``."""
    return _SparseKL.apply(student, top_ids.long(), teacher_log_probs(top_logp, tail_logp), group, vocab_size,
                           temperature)
