"""What a parameter is in the plain model, and how this rank holds it: one typed record per tensor.

Every parameter (and buffer) is tagged at build time with the name it has in the plain, unsharded model and its
full shape. Tensor-parallel layers then record the dimension they split and the padded size of that dimension
(for vocabularies tp does not divide); the pipeline marks the token table both end stages hold. With this record
any layout can turn a local shard into the logical tensor and back, which is what makes checkpoints layout-free.

The record is a frozen dataclass under one attribute (``megatrain_spec``): fields change only by replacing the
whole record (:func:`update_spec`), so nothing can set half of a layout. It travels with the parameter when
materialisation swaps a meta parameter for a real one (``swap_parameters_`` copies the attribute).

DeepSpeed reads its own two marks, ``model_parallel`` and ``tensor_model_parallel`` (its gradient-norm code
counts a marked parameter on every tp rank); those stay DeepSpeed's interface and are set by the tp layers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

SPEC_ATTR = "megatrain_spec"


@dataclass(frozen=True)
class ParamSpec:
    logical_name: str
    logical_shape: tuple[int, ...]
    tp_dim: int | None = None            # the dimension tensor parallelism splits; None = replicated
    tp_padded: int | None = None         # padded size of tp_dim (vocabulary rows padded to a multiple of tp)
    tp_replicas: int = 1                 # that many consecutive tp ranks hold the same slice (kv heads < tp)
    pipeline_tied: bool = False          # held by the first and last pipeline stage; checkpoints write it once
    stand_in: bool = False               # a 4-byte placeholder still to be materialised
    sp_grad_group: object = None         # sequence parallel: sum this replicated parameter's grad over the group
    sp_hooked: bool = False              # the sequence-parallel grad hook is registered
    replica_grad: tuple | None = None    # (tp group, replicas): sum the copies' grads (kv heads replicated over tp)
    replica_hooked: bool = False


def spec_of(t: torch.Tensor) -> ParamSpec | None:
    return getattr(t, SPEC_ATTR, None)


def logical_name(t: torch.Tensor) -> str | None:
    spec = spec_of(t)
    return None if spec is None else spec.logical_name


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    spec = spec_of(t)
    return tuple(t.shape) if spec is None else spec.logical_shape


def update_spec(t: torch.Tensor, **changes) -> ParamSpec:
    """Replace ``t``'s record with one whose ``changes`` differ. A parameter without a record (built outside
    :func:`tag_logical_names`) is a bug, not a user error."""
    spec = spec_of(t)
    assert spec is not None, "parameter has no ParamSpec: tag_logical_names(model) runs first"
    new = dataclasses.replace(spec, **changes)
    setattr(t, SPEC_ATTR, new)
    return new


def tag_logical_names(model: nn.Module) -> None:
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        setattr(p, SPEC_ATTR, ParamSpec(name, tuple(p.shape)))
    for name, b in model.named_buffers():
        setattr(b, SPEC_ATTR, ParamSpec(name, tuple(b.shape)))


def inherit_spec(new: nn.Parameter, old: torch.Tensor, *, tp_dim: int | None,
                 tp_padded: int | None = None) -> nn.Parameter:
    """``new`` (a tp shard built from ``old``) takes ``old``'s logical name and shape plus its split."""
    spec = spec_of(old)
    if spec is not None:
        setattr(new, SPEC_ATTR, dataclasses.replace(spec, tp_dim=tp_dim, tp_padded=tp_padded))
    return new
