"""Structured pruning of Transformers: importance → uniform per-layer sizes → a smaller dense model.

Uniform sizes: the same number of heads / channels is removed from every kept block (which ones is chosen
per block), so the result is an ordinary megatrain config (one num_heads, one ffn_hidden_size) that loads,
shards and exports like any other model. Per-layer (non-uniform) sizes are not supported: the config has
no per-layer fields.

GQA (prune.gqa): ``groups`` removes whole kv groups (a kv head and its query heads), keeping Hq/Hkv;
``within`` removes the same number of query heads from every group and keeps all kv heads. With plain
multi-head attention both are the same.

Tensor parallel: kept head, kv-head and channel counts must divide by tp so the pruned model shards
evenly again; a target that does not is refused with the fraction that would work. Units are chosen from
scores gathered over tp (importance.py), so every rank removes the same units.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from megatrain.compress.importance import Scores
from megatrain.compress.units import group_heads, keep_blocks, prune_heads, prune_mlp
from megatrain.config.schema import ModelConfig, PruneConfig
from megatrain.errors import UserError


@dataclass(frozen=True)
class Sizes:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn: int

    @classmethod
    def of(cls, m: ModelConfig) -> "Sizes":
        return cls(m.num_layers, m.num_heads, m.kv_heads, m.ffn_size)


def _removed(frac: float, n: int, field: str, what: str) -> int:
    r = round(frac * n)
    if frac > 0 and r == 0:
        raise UserError(f"prune.{field}={frac} removes no {what} of {n} (rounds to 0); use at least {1 / n:.3g}")
    if r >= n:
        raise UserError(f"prune.{field}={frac} removes all {n} {what}s; use a fraction below {(n - 0.5) / n:.3g}")
    return r


def _check_tp(kept: int, n: int, tp: int, field: str, frac: float, what: str) -> None:
    if kept % tp:
        ok = [f"{(n - k) / n:.4g}" for k in (kept // tp * tp, kept // tp * tp + tp) if 0 < k < n]
        raise UserError(f"prune.{field}={frac} keeps {kept} of {n} {what}, not divisible by parallel.tp={tp}; "
                         f"use prune.{field}={' or '.join(ok) or '0'} (kept counts that divide by tp)")


def target_sizes(m: ModelConfig, p: PruneConfig, *, tp: int = 1) -> Sizes:
    """The sizes prune.{mlp,heads,layers} ask for, checked for divisibility by tp."""
    if not m.is_transformer:
        raise UserError(f"model.arch={m.arch}: prune.mlp/heads/layers are for gpt2/llama Transformers; "
                         "prune resnet/lstm/gru with prune.channels (megatrain.compress.prune_channels)")
    if p.channels:
        raise UserError(f"prune.channels is for resnet/lstm/gru; for model.arch={m.arch} use prune.mlp, "
                         "prune.heads or prune.layers (and set prune.channels=0)")
    s = Sizes.of(m)
    layers = s.num_layers - _removed(p.layers, s.num_layers, "layers", "block")
    ffn = s.ffn - _removed(p.mlp, s.ffn, "mlp", "MLP channel")
    _check_tp(ffn, s.ffn, tp, "mlp", p.mlp, "MLP channels")
    per = s.num_heads // s.num_kv_heads
    if p.gqa == "groups" or per == 1:
        kv = s.num_kv_heads - _removed(p.heads, s.num_kv_heads, "heads", "kv group" if per > 1 else "head")
        heads = kv * per
    else:
        kv = s.num_kv_heads
        heads = kv * (per - _removed(p.heads, per, "heads", "query head per group"))
    _check_tp(heads, s.num_heads, tp, "heads", p.heads, "query heads")
    _check_tp(kv, s.num_kv_heads, tp, "heads", p.heads, "kv heads")
    return Sizes(layers, heads, kv, ffn)


def step_sizes(start: Sizes, target: Sizes, i: int, n: int, *, tp: int = 1) -> Sizes:
    """Sizes after step i of n of an iterative schedule: kept counts move linearly from start to target,
    rounded so they stay divisible by tp (heads move in whole kv groups / whole per-group counts)."""
    def lerp(a: int, b: int, mult: int = 1) -> int:
        if i >= n:
            return b
        v = a - (a - b) * i / n
        return max(b, min(a, int(round(v / mult)) * mult))

    layers = lerp(start.num_layers, target.num_layers)
    ffn = lerp(start.ffn, target.ffn, tp)
    if target.num_kv_heads != start.num_kv_heads:  # whole groups
        per = start.num_heads // start.num_kv_heads
        kv = lerp(start.num_kv_heads, target.num_kv_heads, tp)
        heads = kv * per
    else:
        kv = start.num_kv_heads
        heads = kv * lerp(start.num_heads // kv, target.num_heads // kv)
    return Sizes(layers, heads, kv, ffn)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties to the lower index, returned sorted (deterministic on every rank)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def prune_model(model: nn.Module, m: ModelConfig, scores: Scores, new: Sizes) -> tuple[nn.Module, ModelConfig]:
    """A pruned copy of ``model`` (plain, unsharded) at sizes ``new``, and its config. ``scores`` are the
    importance of the current model's units (full, gathered)."""
    cur = Sizes.of(m)
    model = copy.deepcopy(model)
    keep_layers = _top(scores.layer, new.num_layers).tolist()
    per = cur.num_heads // cur.num_kv_heads
    for i in keep_layers:
        block = model.layers[i]
        if new.ffn != cur.ffn:
            prune_mlp(block.mlp, _top(scores.mlp[i], new.ffn))
        if new.num_heads != cur.num_heads:
            if new.num_kv_heads != cur.num_kv_heads:  # whole groups: a group's score is its kv head + query heads
                group = scores.q[i].view(cur.num_kv_heads, per).sum(1) + scores.kv[i]
                keep_kv = _top(group, new.num_kv_heads)
                keep_q = group_heads(cur.num_heads, cur.num_kv_heads, keep_kv)
            else:  # the same number of query heads inside every group, kv heads kept
                new_per = new.num_heads // new.num_kv_heads
                q = scores.q[i].view(cur.num_kv_heads, per)
                keep_q = torch.cat([g * per + _top(q[g], new_per) for g in range(cur.num_kv_heads)])
                keep_kv = torch.arange(cur.num_kv_heads)
            prune_heads(block.attn, keep_q, keep_kv)
    if new.num_layers != cur.num_layers:
        keep_blocks(model, keep_layers)
    new_cfg = pruned_model_config(m, new)
    model.cfg = new_cfg
    return model, new_cfg


def pruned_model_config(m: ModelConfig, new: Sizes) -> ModelConfig:
    """The ModelConfig of a model pruned to ``new`` (head_dim unchanged)."""
    fields = m.model_dump()
    fields.update(num_layers=new.num_layers, ffn_hidden_size=new.ffn, num_heads=new.num_heads,
                  num_kv_heads=new.num_kv_heads if new.num_kv_heads != new.num_heads else None)
    if new.num_heads != m.num_heads:
        # Removing heads keeps head_dim, so num_heads·head_dim is no longer hidden_size: the config must
        # record head_dim explicitly.
        if "head_dim" not in ModelConfig.model_fields:
            raise UserError(f"prune.heads: {new.num_heads} heads of dim {m.attn_head_dim} no longer fill "
                             f"model.hidden_size={m.hidden_size}, and this megatrain's ModelConfig has no head_dim "
                             "field to record that; set prune.heads=0 (MLP/depth pruning works)")
        fields["head_dim"] = m.attn_head_dim
    return ModelConfig(**fields)


def num_params(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
