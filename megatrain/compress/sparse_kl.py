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
logits it owns (masked gather), and one max all-reduce of (N,) plus one sum all-reduce of (1 + 2k, N) give
both partition functions and all k selected logits. Full logits are never gathered. Columns at or past
``vocab_size`` (tp padding) are masked out of both the partition function and the tail.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatrain.distributed import host_collectives as hc


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


def _scaled(student: torch.Tensor, temperature: float, start: int, vocab_size: int) -> torch.Tensor:
    """(R, Vl) logits / T as a new fp32 tensor, tp padding columns (global id >= vocab_size) at −inf."""
    z = student.float() / temperature
    if start + z.shape[1] > vocab_size:
        z[:, max(vocab_size - start, 0):] = float("-inf")
    return z


class _SparseKL(torch.autograd.Function):
    # Cost: one exp over the (N, V/tp) logits in forward and none in backward, full-size ops in place. Measured
    # forward + backward on a loaded 2-core CPU at N=1024, V=4096, k=32: ~110 ms, about the dense KL's ~105 ms;
    # a first version with a separately masked tail tensor and boolean-mask indexing took ~300 ms.
    # The tail's mass is summed directly (the selected entries zeroed), never as 1 − Σ top-k, which cancels
    # when the top-k hold nearly all the mass. Selected entries are edited with index_add_ of
    # where(owned, value, 0): exact, and a rank's not-owned ids then add 0 somewhere harmless.

    @staticmethod
    def forward(ctx, student, ids, t_logp, group, vocab_size, temperature):
        # student: (N, Vl) this rank's vocabulary columns (Vl = V without tp); ids: (N, k) global token ids;
        # t_logp: (N, k + 1) teacher log-probs over K and the tail (teacher_log_probs)
        n, vl = student.shape
        k = ids.shape[1]
        start = dist.get_rank(group) * vl if group is not None else 0
        e = _scaled(student, temperature, start, vocab_size)  # (N, Vl), z = s/T for now
        mine = (ids >= start) & (ids < start + vl)  # (N, k): selected tokens this rank owns
        col = (ids - start).clamp(0, vl - 1)  # (N, k)
        flat = (torch.arange(n, device=e.device)[:, None] * vl + col).reshape(-1)  # (N·k,) into e.view(-1)
        zeros = torch.zeros_like(t_logp[:, :k])
        z_sel = torch.where(mine, e.gather(1, col), zeros)  # (N, k)
        m = e.amax(-1)  # (N,)
        if group is not None:
            hc.all_reduce(m, op="max", group=group)
        e.sub_(m[:, None]).exp_()  # (N, Vl): exp(z − m)
        e_sel = torch.where(mine, e.gather(1, col), zeros)
        e.view(-1).index_add_(0, flat, -e_sel.reshape(-1))  # zero the selected entries: e holds the tail
        packed = torch.cat([e.sum(-1)[None], z_sel.t(), e_sel.t()])  # (1 + 2k, N): one all-reduce
        if group is not None:
            hc.all_reduce(packed, group=group)
        tail_sum, z_sel, e_sel = packed[0], packed[1:1 + k].t(), packed[1 + k:].t()
        total = tail_sum + e_sel.sum(-1)  # a sum of positives: no cancellation, one pass fewer over (N, Vl)
        lse, lse_tail = m + total.log(), m + tail_sum.log()  # (N,); lse_tail = −inf when the tail is empty
        # Rows whose whole tail is > 87 nats below the row's max underflow to tail_sum = 0; recompute those with
        # the tail's own max (the same rows on every rank: the sums are all-reduced). Rare by construction.
        fb = torch.nonzero((tail_sum == 0) & (k < vocab_size)).squeeze(1)
        z_fb = torch.empty(0, vl, device=e.device)
        if fb.numel():
            z_fb = _scaled(student[fb], temperature, start, vocab_size)  # (F, Vl)
            z_fb[torch.nonzero(mine[fb], as_tuple=True)[0], col[fb][mine[fb]]] = float("-inf")  # K out
            tmax = z_fb.amax(-1)
            if group is not None:
                hc.all_reduce(tmax, op="max", group=group)
            tsum = (z_fb - tmax[:, None]).exp().sum(-1)
            if group is not None:
                hc.all_reduce(tsum, group=group)
            lse_tail[fb] = tmax + tsum.log()
        p = t_logp.exp()  # (N, k + 1)
        kl = (p[:, :k] * (t_logp[:, :k] - (z_sel - lse[:, None]))).sum(-1)
        tail_term = p[:, k] * (t_logp[:, k] - (lse_tail - lse))
        kl = kl + torch.where(p[:, k] > 0, tail_term, torch.zeros_like(tail_term))  # 0·log 0 = 0
        ctx.save_for_backward(e, total, tail_sum, e_sel, p, flat, mine, fb, z_fb, lse, lse_tail)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl  # (N,) fp32

    @staticmethod
    def backward(ctx, g):
        e, total, tail_sum, e_sel, p, flat, mine, fb, z_fb, lse, lse_tail = ctx.saved_tensors
        k = e_sel.shape[1]
        r = p[:, k]  # (N,) teacher tail mass
        # d KL / d z = q − target. Tail: q_j − r·q_j/q_tail = e_j·(1/total − r/tail_sum); padding: e_j = 0.
        # (an empty tail has r = 0; underflowed rows, tail_sum = 0, are redone below)
        coef = 1 / total - torch.where((r > 0) & (tail_sum > 0), r / tail_sum, torch.zeros_like(r))  # (N,)
        gz = g / ctx.temperature  # (N,)
        grad = e * (coef * gz)[:, None]  # (N, Vl); 0 on K (zeroed in forward) and on padding
        on_k = (e_sel / total[:, None] - p[:, :k]) * gz[:, None]  # (N, k): q_i − p_i
        grad.view(-1).index_add_(0, flat, torch.where(mine, on_k, torch.zeros_like(on_k)).reshape(-1))
        if fb.numel():  # underflowed tails: the same target from the logits, r·exp(z_j − lse_tail)
            rows = (z_fb - lse[fb, None]).exp() - r[fb, None] * (z_fb - lse_tail[fb, None]).exp()  # K at −inf: 0
            keep = grad[fb]
            grad[fb] = torch.where(torch.isneginf(z_fb), keep, rows * gz[fb, None])
        return grad.to(ctx.dtype), None, None, None, None, None


def sparse_kl(student: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor, *,
              temperature: float, vocab_size: int, group=None) -> torch.Tensor:
    """Per-token KL_K (N,) from student logits (N, V) — or (N, V/tp) vocab shards with ``group`` — and the
    teacher's top-k ids (N, k), log-probs (N, k) and tail log-mass (N,) at ``temperature``."""
    return _SparseKL.apply(student, top_ids.long(), teacher_log_probs(top_logp, tail_logp), group, vocab_size,
                           temperature)
