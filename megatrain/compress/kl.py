"""Soft-target KL for distillation: KL(softmax(t/T) ‖ softmax(s/T)) per token, full or vocab-parallel.

The vocab-parallel form takes logits split along the vocabulary over ``group`` (as the tensor-parallel LM
head produces them) and never gathers them: per token, the two maxima, the two sums of exponentials and the
KL partial sum are each one all-reduce of an (N,)-sized vector instead of an all-gather of (N, V). Columns
at or past ``vocab_size`` (tp padding) are masked out, so padding changes neither the loss nor the gradient.
The gradient with respect to the student logits is (softmax(s/T) − softmax(t/T)) / T, computed locally.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatrain.distributed import host_collectives as hc


def kl_per_token(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """(N, V) student and teacher logits -> (N,) fp32 KL(p_t ‖ p_s) at temperature T."""
    log_ps = F.log_softmax(student.float() / temperature, dim=-1)  # (N, V)
    log_pt = F.log_softmax(teacher.detach().float() / temperature, dim=-1)  # (N, V)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, group, vocab_size, temperature):
        # student, teacher: (N, V/tp) local shards of the (padded) vocabulary
        rank, per = dist.get_rank(group), student.shape[-1]
        cols = torch.arange(rank * per, (rank + 1) * per, device=student.device)
        valid = cols < vocab_size  # (V/tp,)
        x = torch.stack([student.float(), teacher.detach().float()]) / temperature  # (2, N, V/tp)
        x = x.masked_fill(~valid, float("-inf"))
        gmax = x.max(dim=-1).values  # (2, N)
        hc.all_reduce(gmax, op="max", group=group)
        shifted = x - gmax.unsqueeze(-1)
        sum_exp = shifted.exp().sum(-1)  # (2, N)
        hc.all_reduce(sum_exp, group=group)
        logp = shifted - sum_exp.log().unsqueeze(-1)  # (2, N, V/tp): log p_s, log p_t; -inf on padding
        p = logp.exp()
        local = torch.where(valid, p[1] * (logp[1] - logp[0]), torch.zeros_like(p[1])).sum(-1)  # (N,)
        hc.all_reduce(local, group=group)
        ctx.save_for_backward(p[0], p[1])
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return local  # (N,) fp32

    @staticmethod
    def backward(ctx, g):
        ps, pt = ctx.saved_tensors
        grad = (ps - pt) * (g / ctx.temperature).unsqueeze(-1)  # (N, V/tp); 0 on padding
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, *, group, vocab_size: int,
                      temperature: float) -> torch.Tensor:
    """Per-token KL (N,) from vocab-sharded (N, V/tp) student and teacher logits; no gradient to the teacher."""
    return _VocabParallelKL.apply(student, teacher, group, vocab_size, temperature)


def distill_loss(kl_mean: torch.Tensor, ce_mean: torch.Tensor, *, alpha: float, temperature: float) -> torch.Tensor:
    """α·T²·KL + (1 − α)·CE. T² keeps the soft-target gradient's scale independent of T
    (Hinton et al. 2015)."""
    return alpha * temperature**2 * kl_mean + (1 - alpha) * ce_mean
