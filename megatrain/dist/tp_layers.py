"""Megatron-style tensor-parallel layers. Each is built from the unsharded layer by keeping this rank's
slice (so a sharded model equals the unsharded one, sliced) and takes its process group explicitly.

Shapes with tp ranks, sequence parallel (sp) off / on:
  ColumnParallelLinear: (B, T, in) | (B, T/tp, in)  ->  (B, T, out/tp)
  RowParallelLinear:    (B, T, in/tp)               ->  (B, T, out) | (B, T/tp, out)
  VocabParallelEmbedding: ids (B, T) -> (B, T, H)  (rows of the padded vocabulary split over ranks)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain.dist.collectives import copy_to_group, gather_for_group, reduce_from_group, reduce_scatter_to_group
from megatrain.errors import UserError


def _mark_sharded(p: nn.Parameter) -> nn.Parameter:
    # DeepSpeed's grad-norm code counts a parameter on every tp rank only if it is marked model-parallel;
    # replicated ones are counted on tp rank 0 alone, so the global norm is exact.
    p.model_parallel = True
    p.tensor_model_parallel = True
    return p


def mark_sequence_parallel_grads(params, group) -> None:
    """Replicated parameters that see a different sequence shard on each tp rank (norm weights, row
    biases under sequence parallelism) need their gradients summed over ``group``. Marked here, hooked by
    :func:`register_sequence_parallel_hooks` once the parameters are real (hooks do not survive
    replacing a meta parameter)."""
    for p in params:
        if p is not None:
            p.sp_grad_group = group


def mark_replicated_grads(params, group, replicas: int) -> None:
    """Parameters whose slice is held by ``replicas`` consecutive ranks of ``group`` (kv heads when tp exceeds
    them): each copy's gradient covers only its rank's query heads, so the copies' gradients are summed
    (and the copies stay equal). Hooked with the sequence-parallel ones."""
    for p in params:
        if p is not None:
            p.tp_replica_grad = (group, replicas)


def _replica_sum(g: torch.Tensor, group, replicas: int) -> torch.Tensor:
    # all_reduce over the whole tp group of a buffer with one slot per distinct slice: ranks holding the
    # same slice add into the same slot. No subgroups, so no process group has to be created for this.
    n, r = dist.get_world_size(group), dist.get_rank(group)
    buf = g.new_zeros((n // replicas,) + tuple(g.shape))
    buf[r // replicas] = g
    dist.all_reduce(buf, group=group)
    return buf[r // replicas]


def register_sequence_parallel_hooks(module: nn.Module) -> int:
    n = 0
    for p in module.parameters():
        replica = getattr(p, "tp_replica_grad", None)
        if replica is not None and p.requires_grad and not getattr(p, "_replica_hooked", False):
            p.register_hook(lambda g, replica=replica: _replica_sum(g, *replica))
            p._replica_hooked = True
            n += 1
        group = getattr(p, "sp_grad_group", None)
        if group is None or not p.requires_grad or getattr(p, "_sp_hooked", False):
            continue

        def hook(g, group=group):
            g = g.clone()
            dist.all_reduce(g, group=group)
            return g

        p.register_hook(hook)
        p._sp_hooked = True
        n += 1
    return n


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 to ``rows`` with zeros (padded vocabulary rows never receive a token)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, group, sequence_parallel: bool = False):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        if weight.shape[0] % n:
            raise UserError(f"ColumnParallelLinear: {weight.shape[0]} output features not divisible by tp={n}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _mark_sharded(nn.Parameter(weight.detach().chunk(n, 0)[r].clone()))  # (out/tp, in)
        self.bias = _mark_sharded(nn.Parameter(bias.detach().chunk(n, 0)[r].clone())) if bias is not None else None

    @classmethod
    def tied_to(cls, embedding: "VocabParallelEmbedding", *, sequence_parallel: bool = False):
        """An LM head sharing the (already sharded) vocabulary rows of a VocabParallelEmbedding."""
        n = dist.get_world_size(embedding.group)
        layer = cls(embedding.weight.new_zeros(n, embedding.weight.shape[1]), None, group=embedding.group,
                    sequence_parallel=sequence_parallel)
        layer.weight = embedding.weight
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group, sequence_parallel: bool = False, pad_out_to: int | None = None):
        w, b = linear.weight, linear.bias
        if pad_out_to:
            w = pad_rows(w.detach(), pad_out_to)
            b = pad_rows(b.detach(), pad_out_to) if b is not None else None
        return cls(w, b, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_for_group(x, self.group, dim=1) if self.sequence_parallel else copy_to_group(x, self.group)
        return F.linear(x, self.weight, self.bias)  # (B, T, out/tp)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, group, sequence_parallel: bool = False):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        if weight.shape[1] % n:
            raise UserError(f"RowParallelLinear: {weight.shape[1]} input features not divisible by tp={n}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _mark_sharded(nn.Parameter(weight.detach().chunk(n, 1)[r].clone()))  # (out, in/tp)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None  # replicated, added once

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group, sequence_parallel: bool = False):
        return cls(linear.weight, linear.bias, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in/tp)
        y = F.linear(x, self.weight)  # partial sums (B, T, out)
        y = reduce_scatter_to_group(y, self.group, dim=1) if self.sequence_parallel else reduce_from_group(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, *, group, padded_vocab: int):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        assert padded_vocab % n == 0, (padded_vocab, n)
        self.group = group
        self.per_rank = padded_vocab // n
        self.start = r * self.per_rank
        self.weight = _mark_sharded(nn.Parameter(pad_rows(weight.detach(), padded_vocab).chunk(n, 0)[r].clone()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight) * (~outside).unsqueeze(-1).to(self.weight.dtype)
        return reduce_from_group(out, self.group)  # each id's row lives on exactly one rank
