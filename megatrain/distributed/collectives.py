"""Tensor-parallel collectives as autograd functions, in conjugate pairs (Megatron-LM's scheme).

Every function takes its process group explicitly. ``dim`` is the tensor dimension being split/gathered:
the last (hidden) dimension for tensor parallelism, the sequence dimension for sequence parallelism.

    copy_to_group        fwd identity          bwd all-reduce
    reduce_from_group    fwd all-reduce        bwd identity
    gather_from_group    fwd all-gather(dim)   bwd split(dim)
    split_to_group       fwd split(dim)        bwd all-gather(dim)
    reduce_scatter_to_group  fwd reduce-scatter(dim)  bwd all-gather(dim)
    gather_for_group     fwd all-gather(dim)   bwd reduce-scatter(dim)   (sequence-parallel entry)
"""
from __future__ import annotations

import torch
from megatrain.distributed import host_collectives as hc
from megatrain.errors import UserError


def _size(group) -> int:
    return hc.world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    return hc.all_reduce(x.contiguous().clone(), group=group)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise UserError(f"cannot split dimension {dim} of size {x.shape[dim]} over {n} ranks; "
                         "choose sizes divisible by the tensor-parallel degree")
    return x.chunk(n, dim=dim)[hc.rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    return torch.cat(hc.all_gather(x, group=group), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise UserError(f"cannot split dimension {dim} of size {x.shape[dim]} over {n} ranks; "
                         "choose sizes divisible by the tensor-parallel degree")
    return hc.reduce_scatter([p.contiguous() for p in x.chunk(n, dim=dim)], group=group)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _GatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


def copy_to_group(x, group):
    return _Copy.apply(x, group)


def reduce_from_group(x, group):
    return _Reduce.apply(x, group)


def gather_from_group(x, group, dim: int = -1):
    return _Gather.apply(x, dim, group)


def split_to_group(x, group, dim: int = -1):
    return _Split.apply(x, dim, group)


def reduce_scatter_to_group(x, group, dim: int = 1):
    return _ReduceScatter.apply(x, dim, group)


def gather_for_group(x, group, dim: int = 1):
    return _GatherReduceScatter.apply(x, dim, group)
