"""Logical names and tensor-parallel shard layout of local parameters.

Every parameter is tagged at build time with the name it has in the plain, unsharded model
(``logical_name``) and its full shape (``logical_shape``); tensor-parallel layers add the dimension they
split (``tp_dim``) and the padded size of that dimension (``tp_padded``, for vocabularies tp does not
divide); ``tp_replicas`` > 1 means that many consecutive tp ranks hold the same slice (kv heads replicated
when tp exceeds their count). With these tags any layout can turn a local shard into the logical tensor and back, which is what
makes checkpoints layout-free.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def tag_logical_names(model: nn.Module) -> None:
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        p.logical_name = name
        p.logical_shape = tuple(p.shape)
    for name, b in model.named_buffers():
        b.logical_name = name


def inherit_tags(new: nn.Parameter, old: torch.Tensor, *, tp_dim: int | None, tp_padded: int | None = None) -> nn.Parameter:
    for attr in ("logical_name", "logical_shape"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new.tp_dim = tp_dim
    new.tp_padded = tp_padded
    return new


def local_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the unpartitioned shape in ds_shape


def shard_of(full: torch.Tensor, p: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of the logical tensor ``full`` for parameter ``p`` (zero-padded if needed)."""
    dim = getattr(p, "tp_dim", None)
    if dim is None or tp_size == 1:
        return full
    rep = getattr(p, "tp_replicas", 1)
    tp_rank, tp_size = tp_rank // rep, tp_size // rep
    padded = getattr(p, "tp_padded", None) or full.shape[dim]
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
    dim = getattr(p, "tp_dim", None)
    if dim is None or tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = torch.cat(parts[::getattr(p, "tp_replicas", 1)], dim=dim)  # one copy of each replicated slice
    true = p.logical_shape[dim]
    return full.narrow(dim, 0, true) if full.shape[dim] != true else full
