"""Importance of every prunable unit: weight magnitude (L1/L2), first-order Taylor, or activations.

Scores are computed from the model as it is laid out on this rank: on a tensor-parallel model each rank
scores its own heads/channels (a contiguous block, in rank order) and the per-unit vectors are gathered over
the tp group, so every rank ends with the same full vectors and picks the same units. Data-dependent scores
(taylor, activation) are summed over the data-parallel group.

Per unit (tensors in megatrain/compress/units.py), with m(w) = |w| (l1), w² (l2) or Σ_batches |w·∂L/∂w|
(taylor), a unit's score is Σ m over its elements; l2 reports the square root of the sum. A block's score is
the sum of its units' scores (magnitude, taylor) or the mean 1 − cos(x_in, x_out) over tokens (activation:
a block that barely turns the residual stream does little, as in ShortGPT's block influence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from megatrain.compress.units import heads_of
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc


@dataclass
class Scores:
    q: torch.Tensor  # (L, Hq) per query head
    kv: torch.Tensor  # (L, Hkv) per kv head (k and v rows; 0 for activation, where groups sum their q heads)
    mlp: torch.Tensor  # (L, F) per intermediate channel
    layer: torch.Tensor  # (L,) per block
    kind: str

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """Reported score of a (sum of) raw unit mass: sqrt for l2, as is otherwise."""
        return x.sqrt() if self.kind == "l2" else x


def _rows(mass: torch.Tensor, n: int) -> torch.Tensor:  # (n·k, ...) -> (n,)
    return mass.reshape(n, -1).sum(1)


def _cols(mass: torch.Tensor, n: int) -> torch.Tensor:  # (out, n·k) -> (n,)
    return mass.reshape(mass.shape[0], n, -1).sum((0, 2))


def _unit_mass(model: nn.Module, mass: Callable[[torch.Tensor], torch.Tensor | None]):
    """Per-unit sums of ``mass(param)`` over this rank's tensors: lists of (Hq,), (Hkv,), (F,) per block."""
    qs, kvs, mlps = [], [], []
    for block in model.layers:
        a, m = block.attn, block.mlp
        hq, hkv = heads_of(a)
        q = _rows(mass(a.q_proj.weight), hq) + _cols(mass(a.o_proj.weight), hq)
        kv = _rows(mass(a.k_proj.weight), hkv) + _rows(mass(a.v_proj.weight), hkv)
        for lin, n, acc in ((a.q_proj, hq, "q"), (a.k_proj, hkv, "kv"), (a.v_proj, hkv, "kv")):
            if lin.bias is not None:
                b = _rows(mass(lin.bias), n)
                q, kv = (q + b, kv) if acc == "q" else (q, kv + b)
        f = m.up_proj.weight.shape[0]
        ch = _rows(mass(m.up_proj.weight), f) + _cols(mass(m.down_proj.weight), f)
        if m.gate_proj is not None:
            ch = ch + _rows(mass(m.gate_proj.weight), f)
        if m.up_proj.bias is not None:
            ch = ch + mass(m.up_proj.bias)
        qs.append(q)
        kvs.append(kv)
        mlps.append(ch)
    return qs, kvs, mlps


def _gather_units(local: torch.Tensor, group) -> torch.Tensor:
    """(L, n_local) on each tp rank -> (L, n_local·tp) in rank order (the order of the unsharded tensor)."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return torch.cat(hc.all_gather(local, group=group), dim=1)


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        x = x.clone()
        hc.all_reduce(x, group=group)
    return x


def _assemble(qs, kvs, mlps, kind: str, tp_group) -> Scores:
    q = _gather_units(torch.stack(qs).double(), tp_group)
    kv = _gather_units(torch.stack(kvs).double(), tp_group)
    mlp = _gather_units(torch.stack(mlps).double(), tp_group)
    layer = q.sum(1) + kv.sum(1) + mlp.sum(1)
    return Scores(q, kv, mlp, layer, kind)


@torch.no_grad()
def magnitude_scores(model: nn.Module, *, kind: str = "l2", tp_group=None) -> Scores:
    """L1 (sum |w|) or L2 (sqrt sum w²) of each unit's weights and biases."""
    fn = (lambda p: p.detach().double().abs()) if kind == "l1" else (lambda p: p.detach().double().square())
    return _assemble(*_unit_mass(model, fn), kind, tp_group)


def taylor_mass(model: nn.Module, batches: Iterable[dict], loss_fn) -> dict[int, torch.Tensor]:
    """id(param) -> Σ over batches of |w·∂L/∂w| per element (float64), in eval mode (no dropout, BN running
    statistics): the score of a fixed model on fixed data."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    was_training = model.training
    model.eval()
    for batch in batches:
        for p in params:
            p.grad = None
        loss_fn(model, batch).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    acc[id(p)] += (p.detach().double() * p.grad.double()).abs()
    for p in params:
        p.grad = None
    model.train(was_training)
    return acc


def taylor_scores(model: nn.Module, batches: Iterable[dict], loss_fn, *, tp_group=None, dp_group=None) -> Scores:
    """First-order Taylor: Σ over calibration batches of |w·∂L/∂w|, summed over each unit's elements.

    |w·g| estimates the loss change of zeroing w (Molchanov et al. 2019); it is taken per batch, then summed,
    so opposite-signed gradients of different batches do not cancel."""
    acc = taylor_mass(model, batches, loss_fn)
    qs, kvs, mlps = _unit_mass(model, lambda p: acc[id(p)])
    s = _assemble(qs, kvs, mlps, "taylor", tp_group)
    return Scores(_sum_over(s.q, dp_group), _sum_over(s.kv, dp_group), _sum_over(s.mlp, dp_group),
                  _sum_over(s.layer, dp_group), "taylor")


@torch.no_grad()
def activation_scores(model: nn.Module, batches: Iterable[dict], *, tp_group=None, dp_group=None,
                      sequence_parallel: bool = False) -> Scores:
    """Mean over tokens of: ‖head output‖₂ per query head (input of o_proj), |x_j| per MLP channel (input of
    down_proj), and 1 − cos(block input, block output) per block."""
    n = len(model.layers)
    q_sum, mlp_sum = [None] * n, [None] * n
    blk = torch.zeros(n, 2, dtype=torch.float64)  # (sum of 1-cos, tokens) per block
    tokens = torch.zeros((), dtype=torch.float64)
    hooks = []

    def on_o(i, d):
        def hook(_mod, args):
            x = args[0].detach().double()  # (B, T, Hq·d)
            h = x.reshape(*x.shape[:2], -1, d).norm(dim=-1).sum((0, 1))  # (Hq,)
            q_sum[i] = h if q_sum[i] is None else q_sum[i] + h
        return hook

    def on_down(i):
        def hook(_mod, args):
            h = args[0].detach().double().abs().sum((0, 1))  # (F,)
            mlp_sum[i] = h if mlp_sum[i] is None else mlp_sum[i] + h
        return hook

    def on_block(i):
        def hook(_mod, args, out):
            x, y = args[0].detach().double(), out.detach().double()  # (B, T, H) each
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # (B, T)
            blk[i, 0] += (1 - cos).sum()
            blk[i, 1] += cos.numel()
        return hook

    for i, block in enumerate(model.layers):
        hooks.append(block.attn.o_proj.register_forward_pre_hook(on_o(i, block.attn.head_dim)))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(block.register_forward_hook(on_block(i)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"]
            model(ids)
            tokens += ids.numel()  # o_proj / down_proj see the full sequence even under sequence parallelism
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    q = _gather_units(torch.stack(q_sum), tp_group)
    mlp = _gather_units(torch.stack(mlp_sum), tp_group)
    if sequence_parallel:  # blocks saw only this rank's sequence shard
        blk = _sum_over(blk, tp_group)
    q, mlp, blk, tokens = (_sum_over(x, dp_group) for x in (q, mlp, blk, tokens))
    hq, hkv = heads_of(model.layers[0].attn)
    kv = torch.zeros(n, q.shape[1] // (hq // hkv), dtype=torch.float64)  # groups score by their query heads
    return Scores(q / tokens, kv, mlp / tokens, blk[:, 0] / blk[:, 1].clamp_min(1), "activation")


def compute_scores(kind: str, model: nn.Module, batches: list[dict], loss_fn=None, *, tp_group=None, dp_group=None,
                   sequence_parallel: bool = False) -> Scores:
    if kind in ("l1", "l2"):
        return magnitude_scores(model, kind=kind, tp_group=tp_group)
    if kind == "taylor":
        return taylor_scores(model, batches, loss_fn, tp_group=tp_group, dp_group=dp_group)
    if kind == "activation":
        return activation_scores(model, batches, tp_group=tp_group, dp_group=dp_group,
                                 sequence_parallel=sequence_parallel)
    raise UserError(f"prune.importance={kind!r} is unknown; use l1, l2, taylor or activation")
