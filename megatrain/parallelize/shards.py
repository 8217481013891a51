"""A local tensor-parallel shard ⇄ the logical tensor, from the parameter's ParamSpec
(megatrain/parallelize/param_spec.py). With these any layout reads and writes the same checkpoint."""
from __future__ import annotations

import torch
from megatrain.distributed import host_collectives as hc
from megatrain.parallelize.param_spec import spec_of


def _tp_layout(p: torch.Tensor) -> tuple[int | None, int | None, int]:
    """(split dimension, padded size, replicas): ``replicas`` consecutive tp ranks hold the same slice."""
    spec = spec_of(p)
    return (None, None, 1) if spec is None else (spec.tp_dim, spec.tp_padded, spec.tp_replicas)


def local_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the unpartitioned shape in ds_shape


def shard_of(full: torch.Tensor, p: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of the logical tensor ``full`` for parameter ``p`` (zero-padded if needed)."""
    dim, padded, rep = _tp_layout(p)
    if dim is None or tp_size == 1:
        return full
    tp_rank, tp_size = tp_rank // rep, tp_size // rep
    padded = padded or full.shape[dim]
    per = padded // tp_size
    start, stop = tp_rank * per, (tp_rank + 1) * per
    real_stop = min(stop, full.shape[dim])
    part = full.narrow(dim, start, max(real_stop - start, 0))
    if part.shape[dim] < per:  # padding rows beyond the true vocabulary are zeros
        pad_shape = list(part.shape)
        pad_shape[dim] = per - part.shape[dim]
        part = torch.cat([part, part.new_zeros(pad_shape)], dim=dim)
    return part


def gather_logical(local: torch.Tensor, p: torch.Tensor, group, tp_size: int) -> torch.Tensor:
    """The logical (unsharded, unpadded) tensor from each tp rank's ``local`` slice. Collective over tp."""
    dim, _, rep = _tp_layout(p)
    if dim is None or tp_size == 1:
        return local
    # local may be a CPU copy (engine_state.py): the module stages it on the group's device (NCCL takes CUDA only)
    full = torch.cat(hc.all_gather(local, group=group)[::rep], dim=dim)  # one copy of each replicated slice
    true = spec_of(p).logical_shape[dim]
    return full.narrow(dim, 0, true) if full.shape[dim] != true else full
