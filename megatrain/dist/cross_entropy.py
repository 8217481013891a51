"""Vocab-parallel cross-entropy: the loss over logits split along the vocabulary, without gathering them.

Per token: global max, sum of exp and the target logit are each one all-reduce over the group of a (N,)
vector, instead of an all-gather of (N, V). Columns at or past ``vocab_size`` (tp padding) are masked to
-inf, so padding never changes the loss or receives gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_size, ignore_index, smoothing):
        # logits: (N, V/tp) local shard, labels: (N,) global ids
        rank = dist.get_rank(group)
        per = logits.shape[-1]
        start = rank * per
        x = logits.float()
        cols = torch.arange(start, start + per, device=x.device)
        valid_cols = cols < vocab_size
        x = x.masked_fill(~valid_cols, float("-inf"))
        gmax = x.max(dim=-1).values
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = x - gmax.unsqueeze(-1)  # (N, V/tp), -inf on padding
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        in_shard = (labels >= start) & (labels < start + per)
        local_t = (labels - start).clamp(0, per - 1)
        target = torch.where(in_shard, shifted.gather(1, local_t.unsqueeze(1)).squeeze(1), torch.zeros_like(gmax))
        sums = torch.stack([sum_exp, target, shifted.masked_fill(~valid_cols, 0.0).sum(-1)])  # (3, N)
        dist.all_reduce(sums, group=group)
        sum_exp, target, sum_logits = sums
        lse = sum_exp.log()
        loss = lse - target
        if smoothing > 0:
            loss = (1 - smoothing) * loss + smoothing * (lse - sum_logits / vocab_size)
        ignored = labels == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), in_shard, local_t, ignored, valid_cols)
        ctx.smoothing, ctx.vocab_size, ctx.dtype = smoothing, vocab_size, logits.dtype
        return loss  # (N,) fp32

    @staticmethod
    def backward(ctx, g):
        softmax, in_shard, local_t, ignored, valid_cols = ctx.saved_tensors
        grad = softmax.clone()  # d lse / d x
        rows = torch.nonzero(in_shard).squeeze(1)
        grad[rows, local_t[rows]] -= 1 - ctx.smoothing
        if ctx.smoothing > 0:
            grad -= (ctx.smoothing / ctx.vocab_size) * valid_cols.to(grad.dtype)
        grad *= g.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, group, vocab_size: int,
                                 ignore_index: int = -100, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token losses (N,) from vocab-sharded logits (N, V/tp); ignored tokens give 0."""
    return _VocabParallelCE.apply(logits, labels, group, vocab_size, ignore_index, label_smoothing)
