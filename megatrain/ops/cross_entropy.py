"""Token cross-entropy: dispatch + plain-torch reference."""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.ops.dispatch import backend_for, provider, register
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc

register("cross_entropy", "triton", "megatrain.triton_kernels.cross_entropy")
_TRITON_FUSED_LINEAR_CE = "megatrain.triton_kernels.fused_linear_cross_entropy"
_TRITON_VOCAB_PARALLEL_CE = "megatrain.triton_kernels.vocab_parallel_cross_entropy"


def cross_entropy_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean",
) -> torch.Tensor:
    # logits: (N, V) any float dtype, labels: (N,); loss in fp32
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", logits_dead: bool = False, policy=None,
) -> torch.Tensor:
    """``logits_dead=True``: the caller never reads ``logits`` again, so the triton backend writes the gradient
    over them instead of a second (N, V) buffer (Liger's trick). The torch path ignores it."""
    backend = backend_for("cross_entropy", logits.device, dtype=logits.dtype, shape={"vocab": logits.shape[-1]},
                          policy=policy)
    if backend != "torch":
        kwargs = {"reuse_logits": True} if logits_dead and backend == "triton" else {}
        return provider("cross_entropy", backend)(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, **kwargs)
    return cross_entropy_reference(logits, labels, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, reduction=reduction)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
) -> torch.Tensor:
    # hidden: (N, H), weight: (V, H), labels: (N,); materialises the (N, V) logits
    logits = F.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   reduction=reduction)


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", policy=None,
) -> torch.Tensor:
    """CE(hidden @ weightᵀ + bias, labels); the triton backend never holds the full (N, V) logits.

    reduction is mean or sum (the fused path has no per-token loss)."""
    if reduction not in ("mean", "sum"):
        raise UserError(f"fused_linear_cross_entropy: reduction={reduction!r}; use mean or sum")
    if backend_for("cross_entropy", hidden.device, dtype=hidden.dtype, shape={"vocab": weight.shape[0]},
                   policy=policy) == "triton":
        return importlib.import_module(_TRITON_FUSED_LINEAR_CE).fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction)
    return fused_linear_cross_entropy_reference(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing, reduction=reduction)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Plain-torch vocab-parallel CE (Megatron's scheme): all-reduce max, sum-exp, target and logit sums.
    Columns at or past ``vocab_size`` (the padding that makes V divisible by tp) are masked to -inf, so padding
    never changes the loss or receives gradient."""

    @staticmethod
    def forward(ctx, local_logits, labels, group, ignore_index, label_smoothing, vocab_start, vocab_size):
        x = local_logits.float()  # (N, V_local)
        n_local = x.shape[1]
        real = torch.arange(vocab_start, vocab_start + n_local, device=x.device) < vocab_size  # (V_local,)
        x = x.masked_fill(~real, float("-inf"))
        m = x.max(dim=-1).values  # (N,); -inf on a shard that is all padding
        hc.all_reduce(m, op="max", group=group)
        x = x - m.unsqueeze(-1)  # shifted: exp never overflows; -inf on padding
        local = labels - vocab_start
        in_shard = (local >= 0) & (local < n_local)
        x_target = torch.where(in_shard, x.gather(1, local.clamp(0, n_local - 1).unsqueeze(-1)).squeeze(-1), 0.0)
        packed = torch.stack([x.exp().sum(-1), x_target, x.masked_fill(~real, 0.0).sum(-1)])  # (3, N)
        hc.all_reduce(packed, group=group)
        sum_exp, x_target, x_sum = packed.unbind(0)
        lse = torch.log(sum_exp)  # shifted by m like x
        valid = labels != ignore_index
        loss = lse - (1.0 - label_smoothing) * x_target - label_smoothing * x_sum / vocab_size
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        softmax = torch.exp(x - lse.unsqueeze(-1))  # (N, V_local), 0 on padding
        ctx.save_for_backward(softmax, local.clamp(0, n_local - 1), in_shard, valid, real)
        ctx.label_smoothing, ctx.vocab_size, ctx.dtype = label_smoothing, vocab_size, local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, in_shard, valid, real = ctx.saved_tensors
        grad = softmax - (ctx.label_smoothing / ctx.vocab_size) * real.float()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[in_shard], local[in_shard]] -= 1.0 - ctx.label_smoothing
        grad = grad * (valid.float() * grad_loss).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy_reference(
    local_logits: torch.Tensor, labels: torch.Tensor, group, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    # local_logits: (N, V_local), this rank's vocab slice; labels: (N,) global ids, the same on every rank
    n_local = local_logits.shape[1]
    start = dist.get_rank(group) * n_local if vocab_start is None else vocab_start
    total = dist.get_world_size(group) * n_local if vocab_size is None else vocab_size
    loss = _VocabParallelCrossEntropy.apply(local_logits, labels, group, ignore_index, label_smoothing, start, total)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (labels != ignore_index).sum()
    raise UserError(f"vocab_parallel_cross_entropy: reduction={reduction!r}; use mean, sum or none")


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, labels: torch.Tensor, group, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", vocab_start: int | None = None,
    vocab_size: int | None = None, policy=None,
) -> torch.Tensor:
    """Cross-entropy over a vocabulary split across ``group`` (a torch.distributed process group).

    Rank r holds columns [r·V_local, (r+1)·V_local) unless ``vocab_start`` says otherwise; ``vocab_size``
    (default tp·V_local) is the real vocabulary: columns at or past it are tp padding and are ignored. Every
    rank gets the same full-vocabulary loss; gradients stay local (no backward communication)."""
    kwargs = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                  vocab_start=vocab_start, vocab_size=vocab_size)
    if backend_for("cross_entropy", local_logits.device, dtype=local_logits.dtype, policy=policy) == "triton":
        return importlib.import_module(_TRITON_VOCAB_PARALLEL_CE).vocab_parallel_cross_entropy(
            local_logits, labels, group, **kwargs)
    return vocab_parallel_cross_entropy_reference(local_logits, labels, group, **kwargs)
