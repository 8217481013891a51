"""Full (unsharded) tensors of a tensor-parallel model: the inverse of the TP transform's slicing.

Used to hand a model trained under any tp layout back to the pruning surgery and to the exporters, which work
on plain tensors. Collective over the tp group: every rank calls it and every rank gets the full state.
"""
from __future__ import annotations

import torch
from torch import nn

from megatrain.parallelize.param_spec import logical_name
from megatrain.distributed.tp_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatrain.distributed import host_collectives as hc


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    return torch.cat(hc.all_gather(t.detach(), group=group), dim=dim)


@torch.no_grad()
def full_state_dict(model: nn.Module, *, vocab_size: int) -> dict[str, torch.Tensor]:
    """name -> full CPU fp32 tensor for a plain or tensor-parallel Transformer (pp=1, ZeRO ≤ 2)."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, ColumnParallelLinear):
            out[prefix + "weight"] = _gather(mod.weight, mod.group, 0)[:vocab_size if "lm_head" in name else None]
            if mod.bias is not None:
                out[prefix + "bias"] = _gather(mod.bias, mod.group, 0)
        elif isinstance(mod, RowParallelLinear):
            out[prefix + "weight"] = _gather(mod.weight, mod.group, 1)
            if mod.bias is not None:
                out[prefix + "bias"] = mod.bias.detach()
        elif isinstance(mod, VocabParallelEmbedding):
            out[prefix + "weight"] = _gather(mod.weight, mod.group, 0)[:vocab_size]
        else:
            for pname, p in mod.named_parameters(recurse=False):
                out[prefix + pname] = p.detach()
    return {k: v.float().cpu().clone() for k, v in out.items()}


@torch.no_grad()
def engine_state_dict(engine, dims) -> dict[str, torch.Tensor]:
    """name -> full CPU fp32 tensor of a model trained by a DeepSpeed engine under any layout: tp, pp and
    ZeRO 0-3. Values come through DeepSpeed's ``safe_get_full_fp32_param`` (ZeRO partitions gathered over dp;
    the fp32 master weights, not a bf16 copy) and are gathered over tp by their shard tags; pipeline stages then
    exchange their layers. Collective over the world: every rank calls it and every rank gets the full state."""
    from megatrain.checkpoint.engine_state import gather_state
    state = {logical_name(p): value.float().cpu().clone()
             for p, value, _ in gather_state(engine, dims, with_optimizer=False)}
    if dims.pp > 1:  # each stage holds its own blocks (the tied token table is on the first and the last)
        parts = hc.all_gather_object(state, group=dims.pp_group)
        state = {name: t for part in parts for name, t in part.items()}
    return state
