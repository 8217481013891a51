"""Structural surgery on a plain (unsharded) Transformer: keep chosen units, physically shrinking tensors.

Units and the tensors they own (d = head_dim):
  query head h   rows h·d:(h+1)·d of q_proj (weight, bias), the same columns of o_proj
  kv head g      rows g·d:(g+1)·d of k_proj and v_proj
  MLP channel j  row j of gate_proj/up_proj (weight, bias), column j of down_proj
  block i        the whole residual block (the residual stream passes through unchanged)

Row-parallel biases (o_proj, down_proj) are added once after the sum over units, so they belong to no unit
and are kept. Removing a unit whose output is exactly zero therefore leaves the model's function unchanged.
Under GQA query head h reads kv head h // (Hq/Hkv): kept query heads must stay grouped in order with an
equal count per kept group, which every selection here guarantees.
"""
from __future__ import annotations

import torch
from torch import nn


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def keep_out_features(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """Linear with only output features ``rows`` (in order)."""
    bias = linear.bias.detach()[rows] if linear.bias is not None else None
    return _linear_like(linear, linear.weight.detach()[rows], bias)


def keep_in_features(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """Linear with only input features ``cols``; the bias (added after the sum) is kept whole."""
    bias = linear.bias.detach() if linear.bias is not None else None
    return _linear_like(linear, linear.weight.detach()[:, cols], bias)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices (len(heads)·d,) of the given heads in a (num_heads·d)-wide projection."""
    return (heads.view(-1, 1) * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def prune_mlp(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate channels ``keep`` (sorted) in gate/up (rows) and down (columns), in place."""
    keep = keep.sort().values
    if mlp.gate_proj is not None:
        mlp.gate_proj = keep_out_features(mlp.gate_proj, keep)
    mlp.up_proj = keep_out_features(mlp.up_proj, keep)
    mlp.down_proj = keep_in_features(mlp.down_proj, keep)


def prune_heads(attn: nn.Module, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
    """Keep query heads ``keep_q`` and kv heads ``keep_kv`` (sorted; GQA grouping already consistent)."""
    d = attn.head_dim
    q_rows, kv_rows = head_rows(keep_q.sort().values, d), head_rows(keep_kv.sort().values, d)
    attn.q_proj = keep_out_features(attn.q_proj, q_rows)
    attn.k_proj = keep_out_features(attn.k_proj, kv_rows)
    attn.v_proj = keep_out_features(attn.v_proj, kv_rows)
    attn.o_proj = keep_in_features(attn.o_proj, q_rows)


def keep_blocks(model: nn.Module, keep: list[int]) -> None:
    """Keep Transformer blocks ``keep`` (in their original order)."""
    model.layers = nn.ModuleList(model.layers[i] for i in sorted(keep))


def heads_of(attn: nn.Module) -> tuple[int, int]:
    """(query heads, kv heads) read from the projection shapes (local counts on a sharded model)."""
    d = attn.head_dim
    return attn.q_proj.weight.shape[0] // d, attn.k_proj.weight.shape[0] // d


def group_heads(num_q: int, num_kv: int, groups: torch.Tensor) -> torch.Tensor:
    """Query heads (sorted) belonging to kv groups ``groups``."""
    per = num_q // num_kv
    return (groups.sort().values.view(-1, 1) * per + torch.arange(per)).reshape(-1)
