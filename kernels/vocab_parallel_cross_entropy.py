"""Vocab-parallel cross-entropy: each rank holds logits for its slice of the vocabulary.

Pass 1 (kernel): per row, the shard's max, sum-exp, target logit (if the label falls in the shard)
and logit sum. Two all-reduces over the group (max; then sum of the rescaled sum-exp, target logit,
logit sum packed into one tensor) give every rank the full-vocabulary lse and loss. Pass 2 (kernel)
writes the shard's gradient. The backward needs no communication. The group is always an argument.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatrain.distributed import host_collectives as hc
from megatrain.triton_kernels.cross_entropy import (
    _row_stats, _row_write_grad, check_ce_args, grad_scale, scale_grad_, vocab_block,
)


@triton.jit
def _vp_stats_kernel(LOGITS, LABELS, M, S, XT, XSUM, stride_l, n_cols, vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # A label outside this shard (or ignore_index) gives a local index no column matches.
    label_local = tl.load(LABELS + row) - vocab_start
    m, s, x_target, x_sum = _row_stats(LOGITS + row * stride_l, n_cols, label_local, BLOCK)
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(XT + row, x_target)
    tl.store(XSUM + row, x_sum)


@triton.jit
def _vp_grad_kernel(
    LOGITS, LABELS, GRAD, LSE, SCALE, stride_l, stride_g, n_cols, vocab_start, vocab_total, ignore_index,
    smoothing, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    scale = tl.where(label != ignore_index, tl.load(SCALE), 0.0)
    _row_write_grad(LOGITS + row * stride_l, GRAD + row * stride_g, n_cols, label - vocab_start,
                    tl.load(LSE + row), scale, smoothing, vocab_total, BLOCK)


def _shard_range(local_logits, group, vocab_start, vocab_size):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_local = local_logits.shape[1]
    start = rank * n_local if vocab_start is None else vocab_start
    total = n_local * world if vocab_size is None else vocab_size
    return start, total


def vocab_parallel_cross_entropy_forward(local_logits, labels, group, *, ignore_index=-100, label_smoothing=0.0,
                                         reduction="mean", vocab_start=None, vocab_size=None, compute_grad=True,
                                         block=None):
    """Host launcher. local_logits (N, V_local) for vocab ids [vocab_start, vocab_start + V_local);
    labels (N,) global ids, the same on every rank. Returns (loss, local grad (N, V_local) or None)."""
    op = "vocab_parallel_cross_entropy"
    check_ce_args(op, local_logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    if local_logits.stride(-1) != 1:
        local_logits = local_logits.contiguous()
    labels = labels.contiguous()
    n_rows, n_local = local_logits.shape
    start, total = _shard_range(local_logits, group, vocab_start, vocab_size)
    # Columns at or past `total` are tp padding: the kernels only walk the first n_cols (real) columns, so
    # padding never enters the max/sum-exp/logit sum, and its gradient stays the zero it is initialised to.
    n_cols = max(0, min(n_local, total - start))
    stats = torch.empty((4, n_rows), device=local_logits.device, dtype=torch.float32)
    m, s, x_target, x_sum = stats.unbind(0)  # (N,) each
    block = vocab_block(max(n_cols, 1), block=block)
    warps = 16 if n_cols >= 8192 else 4
    if n_cols == 0:  # a shard of padding only: the identity of each reduction
        m.fill_(float("-inf"))
        s.zero_(), x_target.zero_(), x_sum.zero_()
    elif n_rows:
        _vp_stats_kernel[(n_rows,)](local_logits, labels, m, s, x_target, x_sum, local_logits.stride(0), n_cols,
                                    start, BLOCK=block, num_warps=warps)
    m_global = m.clone()
    hc.all_reduce(m_global, op="max", group=group)
    packed = torch.stack([s * torch.exp(m - m_global), x_target, x_sum])  # (3, N): one all-reduce, not three
    hc.all_reduce(packed, group=group)
    s_global, xt_global, xsum_global = packed.unbind(0)
    lse = m_global + torch.log(s_global)  # (N,) full-vocabulary log-sum-exp
    loss_rows = lse - (1.0 - label_smoothing) * xt_global - label_smoothing * xsum_global / total
    valid = labels != ignore_index
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))
    n_valid, scale = grad_scale(labels, ignore_index, reduction)
    grad = None
    if compute_grad:
        grad = torch.empty_like(local_logits) if n_cols == n_local else torch.zeros_like(local_logits)
        if n_rows and n_cols:
            _vp_grad_kernel[(n_rows,)](
                local_logits, labels, grad, lse.contiguous(), scale, local_logits.stride(0), grad.stride(0), n_cols,
                start, total, ignore_index, float(label_smoothing), BLOCK=block, num_warps=warps)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / n_valid[0]
    return loss, grad


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, labels, group, ignore_index, label_smoothing, reduction, vocab_start, vocab_size):
        loss, grad = vocab_parallel_cross_entropy_forward(
            local_logits, labels, group, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction, vocab_start=vocab_start, vocab_size=vocab_size,
            compute_grad=ctx.needs_input_grad[0])
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad is None:
            raise RuntimeError("vocab_parallel_cross_entropy: backward called twice (retain_graph is not supported)")
        grad, ctx.grad = ctx.grad, None
        return scale_grad_(grad, grad_output), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, group, *,
                                 ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                                 vocab_start: int | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Cross-entropy over a vocabulary split across ``group`` (a torch.distributed process group).

    local_logits (N, V_local): this rank's columns; by default rank r holds ids [r·V_local, (r+1)·V_local)
    (``vocab_start``/``vocab_size`` override that for uneven splits). labels (N,): global ids, identical
    on every rank. Every rank returns the same full-vocabulary loss (fp32); gradients stay local."""
    return VocabParallelCrossEntropyFunction.apply(local_logits, labels, group, ignore_index, label_smoothing,
                                                   reduction, vocab_start, vocab_size)
