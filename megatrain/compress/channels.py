"""Channel-style pruning units (CNN inner channels, RNN hidden units) described by the tensors they own.

A ``Group`` is a set of ``size`` interchangeable units (the inner channels of one residual block, the hidden
units of one RNN layer and direction). Each ``Slice`` names one tensor (a state-dict key) and the axis along
which the units index it: unit j owns index ``offset + g·size + j`` for every gate block g < ``gates`` (LSTM
weights stack 4 gates of ``size`` rows, GRU 3; a bidirectional layer's input has the forward units at offset
0 and the backward units at offset H). Buffers (BatchNorm running statistics) are sliced like parameters but
carry no importance.

The same description drives both importance (``unit_mass``: Σ of a per-element mass over every element a
unit owns, each element once) and surgery (``remove_units``: drop the removed indices from every tensor on
every axis, then load the result into a model built from the smaller config, strictly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Slice:
    name: str  # state-dict key
    dim: int  # axis the units index
    gates: int = 1  # gate blocks of `size` along dim; unit j owns offset + g·size + j
    offset: int = 0  # start of this group's block along dim


@dataclass(frozen=True)
class Group:
    key: str  # stable name of the group, e.g. "stages.1.0.conv1" or "rnn.l0_reverse"
    size: int  # units in the group
    slices: tuple[Slice, ...]
    stage: int = 0  # which per-stage size this group follows (ResNet stage; 0 for RNNs)

    def indices(self, s: Slice, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``s.dim`` owned by ``units`` (k,) -> (gates·k,)."""
        return (s.offset + torch.arange(s.gates).view(-1, 1) * self.size + units.view(1, -1)).reshape(-1)


def _slice_mass(group: Group, s: Slice, m: torch.Tensor) -> torch.Tensor:
    """Per-unit sum of ``m`` over the slice: (..., offset+gates·size, ...) -> (size,)."""
    block = m.narrow(s.dim, s.offset, s.gates * group.size).movedim(s.dim, 0)
    return block.reshape(s.gates, group.size, -1).sum((0, 2))


def _overlap_mass(group: Group, a: Slice, b: Slice, m: torch.Tensor) -> torch.Tensor:
    """Per-unit mass of the elements two slices of one 2-D tensor share (an RNN's own recurrent weight: the
    unit's gate rows meet its column at weight_hh[g·H + j, j]) -> (size,)."""
    (r, c) = (a, b) if a.dim == 0 else (b, a)
    n = group.size
    sub = m.narrow(0, r.offset, r.gates * n).narrow(1, c.offset, c.gates * n)  # (Gr·n, Gc·n)
    return torch.diagonal(sub.reshape(r.gates, n, c.gates, n), dim1=1, dim2=3).sum((0, 1))


def unit_mass(groups: list[Group], mass: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """group key -> (size,) float64 Σ ``mass[name]`` over every element each unit owns (once). Names absent
    from ``mass`` (buffers) are skipped."""
    out = {}
    for g in groups:
        total = torch.zeros(g.size, dtype=torch.float64)
        owned = [s for s in g.slices if s.name in mass]
        for s in owned:
            total += _slice_mass(g, s, mass[s.name]).double().cpu()
        for i, a in enumerate(owned):
            for b in owned[i + 1:]:
                if a.name == b.name and a.dim != b.dim:
                    total -= _overlap_mass(g, a, b, mass[a.name]).double().cpu()
        out[g.key] = total
    return out


def remove_units(state: dict[str, torch.Tensor], groups: list[Group],
                 removed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict without the units ``removed[group key]`` (indices into the group) of every group."""
    drop: dict[tuple[str, int], list[torch.Tensor]] = {}
    for g in groups:
        units = removed.get(g.key)
        if units is None or units.numel() == 0:
            continue
        for s in g.slices:
            drop.setdefault((s.name, s.dim), []).append(g.indices(s, units))
    out = dict(state)
    for (name, dim), parts in drop.items():
        t = out[name]
        keep = torch.ones(t.shape[dim], dtype=torch.bool)
        keep[torch.cat(parts)] = False
        out[name] = t.index_select(dim, keep.nonzero().view(-1).to(t.device)).contiguous()
    return out


def removed_by_score(groups: list[Group], scores: dict[str, torch.Tensor],
                     keep_count: Callable[[Group], int]) -> dict[str, torch.Tensor]:
    """Per group, the units outside the ``keep_count(group)`` highest scores (ties keep the lower index)."""
    out = {}
    for g in groups:
        k = keep_count(g)
        order = torch.sort(scores[g.key], descending=True, stable=True).indices
        out[g.key] = order[k:].sort().values
    return out
