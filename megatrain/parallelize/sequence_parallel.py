"""Sequence parallelism's gradient rule for replicated parameters.

Under sequence parallelism each tp rank runs the norms (and adds the row biases) on its own slice of the
sequence, so a replicated parameter there gets only a partial gradient on each rank; the full one is the sum
over the tp group. The parameters are marked while the model is still on meta (in their ParamSpec) and hooked
once they are real, because a hook does not survive replacing a meta parameter.
"""
from __future__ import annotations

from torch import nn

from megatrain.distributed import host_collectives as hc
from megatrain.parallelize.param_spec import spec_of, update_spec


def mark_sequence_parallel_grads(params, group) -> None:
    """Replicated parameters that see a different sequence shard on each tp rank (norm weights, row
    biases under sequence parallelism) need their gradients summed over ``group``. Marked here, hooked by
    :func:`register_sequence_parallel_hooks` once the parameters are real (hooks do not survive
    replacing a meta parameter)."""
    for p in params:
        if p is not None:
            update_spec(p, sp_grad_group=group)


def register_sequence_parallel_hooks(module: nn.Module) -> int:
    n = 0
    for p in module.parameters():
        spec = spec_of(p)
        if spec is None or spec.sp_grad_group is None or not p.requires_grad or spec.sp_hooked:
            continue
        group = spec.sp_grad_group

        def hook(g, group=group):
            return hc.all_reduce(g.clone(), group=group)

        p.register_hook(hook)
        update_spec(p, sp_hooked=True)
        n += 1
    return n
