"""Meta-device models made real, each rank reading only the tensors it owns.

A Transformer is built on the meta device (no memory), sharded by the tensor-parallel transform (still
meta), optionally cut into pipeline stages, and only then are the parameters this rank keeps filled — from
the name-seeded init, a Hugging Face directory, or a megatrain checkpoint, one logical tensor at a time.
Peak memory is this rank's share plus one full tensor, never the whole model.

Parameters are swapped for new ``nn.Parameter`` objects (meta tensors cannot be assigned CPU data); a
memo keeps tied weights tied and every tag (logical name, tp layout) travels with the new parameter.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from megatrain.parallelize.shards import shard_of
from megatrain.errors import CheckpointError
from megatrain.parallelize.param_spec import logical_shape, spec_of, update_spec


class TensorSource(Protocol):
    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The full logical tensor called ``name`` (fp32 or the stored dtype), of shape ``shape``."""


class InitSource:
    """Name-seeded initialisation (megatrain.models.transformer.init_tensor)."""

    def __init__(self, *, seed: int, std: float, num_layers: int):
        self.seed, self.std, self.num_layers = seed, std, num_layers

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        from megatrain.models.transformer import init_tensor
        return init_tensor(name, shape, seed=self.seed, std=self.std, num_layers=self.num_layers)


def _row_shard(source, p, name: str, tp_rank: int, tp_size: int) -> torch.Tensor | None:
    """This rank's rows read straight from the file for dim-0 shards, or None (read whole, then slice)."""
    spec = spec_of(p)
    if tp_size == 1 or spec is None or spec.tp_dim != 0 or not hasattr(source, "rows"):
        return None
    tp_rank, tp_size = tp_rank // spec.tp_replicas, tp_size // spec.tp_replicas
    per = (spec.tp_padded or spec.logical_shape[0]) // tp_size
    part = source.rows(name, tp_rank * per, (tp_rank + 1) * per)
    if part is None:
        return None
    if part.shape[0] < per:  # vocabulary padding rows past the real vocabulary
        part = torch.cat([part, part.new_zeros(per - part.shape[0], *part.shape[1:])])
    return part


def swap_parameters_(model: nn.Module, make: Callable[[nn.Parameter], torch.Tensor], *, only=None) -> None:
    """Replace parameters (all, or those whose id is in ``only``) with ``nn.Parameter(make(old))``."""
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, old in list(module._parameters.items()):
            if old is None or (only is not None and id(old) not in only):
                continue
            new = memo.get(id(old))
            if new is None:
                new = nn.Parameter(make(old), requires_grad=old.requires_grad)
                new.__dict__.update(old.__dict__)  # the ParamSpec and DeepSpeed's model-parallel marks
                memo[id(old)] = new
            module._parameters[key] = new


def placeholders_(model: nn.Module) -> None:
    """Meta parameters → zero-stride CPU stand-ins (4 bytes each) that still report their shape, so
    DeepSpeed can partition pipeline stages by parameter count and move them to a device for free."""
    def stand_in(p):
        update_spec(p, stand_in=True)  # copied onto the new parameter; survives DeepSpeed's .to(device)
        return torch.empty(1, dtype=p.dtype).expand(p.shape)
    swap_parameters_(model, stand_in, only={id(p) for p in model.parameters() if p.is_meta})


class StateSource:
    """Full tensors from an in-memory state dict (a pruned/distilled model dir, ``model.init_from``)."""

    def __init__(self, state: dict[str, torch.Tensor], origin: str):
        self.state, self.origin = state, origin

    def has(self, name: str) -> bool:
        return name in self.state

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.state:
            raise CheckpointError(f"{self.origin} has no tensor {name!r}; it holds another architecture")
        t = self.state[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.origin}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(shape)}; the config's model sizes differ from the saved model's")
        return t


def load_buffers_(model: nn.Module, source) -> int:
    """Copy saved buffers (BatchNorm running statistics, step counters) into ``model``. Buffers are state, not
    parameters: without this a resumed or re-initialised CNN would evaluate with fresh running statistics.
    Only sources that say which tensors they hold (``has``) are read; the name-seeded init has none."""
    if not hasattr(source, "has"):
        return 0
    count = 0
    with torch.no_grad():
        for buf in model.buffers():
            spec = spec_of(buf)
            name = None if spec is None else spec.logical_name
            if name is not None and source.has(name):
                buf.copy_(source.tensor(name, tuple(buf.shape)).to(buf.dtype))
                count += 1
    return count


def _is_stand_in(p: torch.Tensor) -> bool:
    spec = spec_of(p)
    return p.is_meta or (spec is not None and spec.stand_in)


def materialize_(model: nn.Module, source: TensorSource, *, tp_rank: int, tp_size: int, device,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False, only=None) -> int:
    """Fill this rank's parameters from ``source`` (stand-ins always; real ones too if ``overwrite``;
    restricted to the parameters in ``only`` if given). Returns the number of tensors read."""
    only_ids = None if only is None else {id(q) for q in only}
    todo = {id(p) for p in model.parameters()
            if (overwrite or _is_stand_in(p)) and (only_ids is None or id(p) in only_ids)}
    count = 0

    def make(p: nn.Parameter) -> torch.Tensor:
        nonlocal count
        count += 1
        assert spec_of(p) is not None, "materialize: a parameter has no ParamSpec (built outside parallelize?)"
        name = update_spec(p, stand_in=False).logical_name
        part = _row_shard(source, p, name, tp_rank, tp_size)
        if part is None:
            full = source.tensor(name, logical_shape(p))
            part = shard_of(full, p, tp_rank, tp_size)
        return part.to(device=device, dtype=dtype).contiguous()

    swap_parameters_(model, make, only=todo)
    return count
