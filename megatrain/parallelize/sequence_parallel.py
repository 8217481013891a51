"""Gradient rules for parameters that several tp ranks hold whole or in equal copies.

- Sequence parallelism: each tp rank runs the norms (and adds the row biases) on its own slice of the sequence,
  so a replicated parameter there gets only a partial gradient on each rank; the full one is the sum over tp.
- Replicated kv heads (tp > num_kv_heads): ``replicas`` consecutive ranks hold a copy of the same head, and each
  copy's gradient covers only its rank's query heads, so the copies' gradients are summed (the copies stay equal).

The parameters are marked while the model is still on meta (in their ParamSpec) and hooked once they are real,
because a hook does not survive replacing a meta parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from megatrain.distributed import host_collectives as hc
from megatrain.parallelize.param_spec import spec_of, update_spec


def mark_sequence_parallel_grads(params, group) -> None:
    """Replicated parameters that see a different sequence shard on each tp rank (norm weights, row biases under
    sequence parallelism): their gradients are summed over ``group``."""
    for p in params:
        if p is not None:
            update_spec(p, sp_grad_group=group)


def mark_replicated_grads(params, group, replicas: int) -> None:
    """Parameters whose slice is held by ``replicas`` consecutive ranks of ``group``: the copies' grads are summed."""
    for p in params:
        if p is not None:
            update_spec(p, replica_grad=(group, replicas))


def _replica_sum(g: torch.Tensor, group, replicas: int) -> torch.Tensor:
    # all_reduce over the whole tp group of a buffer with one slot per distinct slice: ranks holding the
    # same slice add into the same slot. No subgroups, so no process group has to be created for this.
    n, r = hc.world_size(group), hc.rank(group)
    buf = g.new_zeros((n // replicas,) + tuple(g.shape))  # (distinct slices, *g.shape)
    buf[r // replicas] = g
    return hc.all_reduce(buf, group=group)[r // replicas]


def register_sequence_parallel_hooks(module: nn.Module) -> int:
    """Hook every marked parameter once; returns the number of hooks added."""
    n = 0
    for p in module.parameters():
        spec = spec_of(p)
        if spec is None or not p.requires_grad:
            continue
        if spec.replica_grad is not None and not spec.replica_hooked:
            p.register_hook(lambda g, replica=spec.replica_grad: _replica_sum(g, *replica))
            spec = update_spec(p, replica_hooked=True)
            n += 1
        if spec.sp_grad_group is not None and not spec.sp_hooked:
            p.register_hook(lambda g, group=spec.sp_grad_group: hc.all_reduce(g.clone(), group=group))
            update_spec(p, sp_hooked=True)
            n += 1
    return n
