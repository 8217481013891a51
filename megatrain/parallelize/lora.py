"""LoRA and parameter freezing as a transform over a built (possibly tensor-parallel) Transformer.

A targeted projection ``y = W x + b`` becomes ``y = W x + b + (alpha / r) · B A dropout(x)`` with A (r, in) drawn
kaiming-uniform from the (seed, name) generator and B (out, r) zeros, so a fresh adapter leaves the logits
unchanged. The adapters are two parameters registered on the projection itself (``<proj>.lora_A``,
``<proj>.lora_B``) and the projection's forward is replaced on the instance, so every base parameter keeps its
name: checkpoints, HF maps and the pipeline split see the same model plus two tensors per projection.
Every base parameter is frozen (``requires_grad=False``: no gradient, no optimizer state).

Under tensor parallelism the adapters are sharded to match the base (their ParamSpec says how, so
checkpoints and resume under another layout read and write the logical A and B):
- ColumnParallel base (W split on out): A replicated, B split on out — with the same kv-head replication
  as W when tp exceeds the kv heads. Each rank's A gets the gradient of its B shard only, so A's gradient
  is summed over tp (the replica-gradient rule of sequence_parallel.py with every tp rank one copy).
- RowParallel base (W split on in): A split on in, B replicated. A's partial products are reduced in the
  same collective as W's (one all-reduce or reduce-scatter of (B, T, out + r)); under sequence parallelism
  B sees a different sequence shard per rank and its gradient is summed over tp like the norms'.

``train.freeze`` (glob patterns, 'embeddings', 'layers.<N') freezes parameters for plain partial
fine-tuning; it runs on the whole model before the pipeline cut, so a pattern is checked against every name.
"""
from __future__ import annotations

import fnmatch
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.config.schema import LoraConfig
from megatrain.distributed import host_collectives as hc
from megatrain.distributed.collectives import (copy_to_group, gather_for_group, reduce_from_group,
                                               reduce_scatter_to_group)
from megatrain.distributed.tp_layers import ColumnParallelLinear, RowParallelLinear
from megatrain.parallelize.tensor_parallel import ReplicatedKVProjection
from megatrain.errors import ConfigError
from megatrain.parallelize.param_spec import SPEC_ATTR, ParamSpec, spec_of
from megatrain.parallelize.sequence_parallel import mark_replicated_grads, mark_sequence_parallel_grads

ADAPTER_LEAVES = ("lora_A", "lora_B")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_LEAVES


def adapter_init(name: str, shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """A: kaiming-uniform(a=√5) as nn.Linear (bound 1/√in), from the (seed, name) generator; B: zeros."""
    if name.endswith(".lora_B"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(shape[1])
    return torch.rand(shape, generator=gen) * (2 * bound) - bound


class LoraSource:
    """A TensorSource that adds the adapters to another: a checkpoint's adapters when it holds them (resume of a
    LoRA run), else fresh ones (``adapter_init``); every other tensor comes from ``inner``."""

    def __init__(self, inner, *, seed: int):
        self.inner, self.seed = inner, seed

    def has(self, name: str) -> bool:
        return hasattr(self.inner, "has") and self.inner.has(name)

    def rows(self, name: str, start: int, stop: int):
        if is_adapter(name) or not hasattr(self.inner, "rows"):
            return None
        return self.inner.rows(name, start, stop)

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if is_adapter(name):
            return self.inner.tensor(name, shape) if self.has(name) else adapter_init(name, shape, seed=self.seed)
        return self.inner.tensor(name, shape)


# ---- the adapted forwards (one per kind of base layer) --------------------------------------------------

def _plain_forward(m: nn.Linear, scale: float):
    def forward(x):  # (B, T, in) -> (B, T, out)
        h = F.linear(m.lora_dropout(x), m.lora_A)  # (B, T, r)
        return F.linear(x, m.weight, m.bias) + scale * F.linear(h, m.lora_B)
    return forward


def _column_forward(m: ColumnParallelLinear, scale: float):
    def forward(x):  # (B, T, in) | (B, T/tp, in) under sp  ->  (B, T, out/tp)
        x = gather_for_group(x, m.group, dim=1) if m.sequence_parallel else copy_to_group(x, m.group)
        h = F.linear(m.lora_dropout(x), m.lora_A)  # (B, T, r): the same on every tp rank
        return F.linear(x, m.weight, m.bias) + scale * F.linear(h, m.lora_B)
    return forward


def _replicated_kv_forward(m: ReplicatedKVProjection, scale: float):
    def forward(x):  # as the base: (B, T, in) | (B, T/tp, in) under sp -> (B, T, q_heads/tp * D)
        x, rows = m.gather_input(x), m.rows
        h = F.linear(m.lora_dropout(x), m.lora_A)  # (B, T, r)
        y = F.linear(x, m.weight[rows], None if m.bias is None else m.bias[rows])
        return m.expand_heads(y + scale * F.linear(h, m.lora_B[rows]))  # B's rows of the kv heads used here
    return forward


def _row_forward(m: RowParallelLinear, scale: float):
    def forward(x):  # (B, T, in/tp) -> (B, T, out) | (B, T/tp, out) under sp
        out = m.weight.shape[0]
        partial = torch.cat([F.linear(x, m.weight), F.linear(m.lora_dropout(x), m.lora_A)], dim=-1)  # (B, T, out+r)
        if m.sequence_parallel:
            full = reduce_scatter_to_group(partial, m.group, dim=1)
        else:
            full = reduce_from_group(partial, m.group)
        y, h = full.split([out, full.shape[-1] - out], dim=-1)  # base (.., out), adapter input (.., r)
        y = y + scale * F.linear(h, m.lora_B)
        return y + m.bias if m.bias is not None else y
    return forward


# ---- adding the adapters ----------------------------------------------------------------------------------

def _new_param(shape, like: torch.Tensor, spec: ParamSpec) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=like.dtype, device="meta"))  # filled by materialisation
    setattr(p, SPEC_ATTR, spec)
    return p


def _adapt(module: nn.Module, lora: LoraConfig) -> list[nn.Parameter]:
    """Give ``module`` its adapters (meta) and the adapted forward; returns [A, B]."""
    base = spec_of(module.weight)
    out, inp = base.logical_shape
    r, name = lora.rank, base.logical_name.rsplit(".", 1)[0]
    a_spec = ParamSpec(f"{name}.lora_A", (r, inp))
    b_spec = ParamSpec(f"{name}.lora_B", (out, r))
    if isinstance(module, ColumnParallelLinear):
        b_spec = ParamSpec(b_spec.logical_name, b_spec.logical_shape, tp_dim=0, tp_padded=base.tp_padded,
                           tp_replicas=base.tp_replicas)
        a_local, b_local = (r, inp), (module.weight.shape[0], r)
        forward = _column_forward
    elif isinstance(module, RowParallelLinear):
        a_spec = ParamSpec(a_spec.logical_name, a_spec.logical_shape, tp_dim=1)
        a_local, b_local = (r, module.weight.shape[1]), (out, r)
        forward = _row_forward
    elif isinstance(module, ReplicatedKVProjection):  # k/v kept whole under tp: so are both adapters
        a_local, b_local = (r, inp), (out, r)
        forward = _replicated_kv_forward
    else:
        a_local, b_local = (r, inp), (out, r)
        forward = _plain_forward
    module.lora_A = _new_param(a_local, module.weight, a_spec)
    module.lora_B = _new_param(b_local, module.weight, b_spec)
    module.lora_dropout = nn.Dropout(lora.dropout)
    module.forward = forward(module, lora.scale)
    if isinstance(module, ColumnParallelLinear):
        group, tp = module.group, hc.world_size(module.group)
        mark_replicated_grads([module.lora_A], group, tp)  # every rank holds A; each sees only its B shard
        # DeepSpeed's grad norm: B like W (the first copy of a replicated kv head counts), A on tp rank 0 only
        module.lora_B.model_parallel = module.lora_B.tensor_model_parallel = getattr(module.weight, "model_parallel", True)
        if base.tp_replicas > 1:
            mark_replicated_grads([module.lora_B], group, base.tp_replicas)
    elif isinstance(module, ReplicatedKVProjection):
        # each rank's gradients cover its own query heads' use of the shared kv heads, as for the base weight
        mark_replicated_grads([module.lora_A, module.lora_B], module.group, hc.world_size(module.group))
    elif isinstance(module, RowParallelLinear):
        module.lora_A.model_parallel = module.lora_A.tensor_model_parallel = True
        if module.sequence_parallel:
            mark_sequence_parallel_grads([module.lora_B], module.group)
    return [module.lora_A, module.lora_B]


def _projections(model: nn.Module, targets) -> list[nn.Module]:
    found = []
    for block in model.layers:
        for proj in targets:
            owner = block.attn if proj in _ATTN else block.mlp
            module = getattr(owner, proj, None)
            if module is None:  # gate_proj outside llama (checked here: model.from_hf sets the arch after parsing)
                raise ConfigError(f"model.lora.targets names {proj} but this {model.cfg.arch} model has none; "
                                  f"remove {proj}")
            found.append(module)
    return found


def apply_lora(model: nn.Module, lora: LoraConfig, *, seed: int) -> int:
    """Freeze every parameter of ``model`` and add adapters to the targeted projections; returns their number.
    On a meta model they stay meta (materialisation fills them from a LoraSource); on a real one they are
    filled here from the name-seeded adapter init."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = [p for module in _projections(model, lora.targets) for p in _adapt(module, lora)]
    base = next(iter(model.layers)).attn.q_proj.weight
    if not base.is_meta:
        from megatrain.parallelize.materialize import materialize_
        group = getattr(next(iter(model.layers)).attn.q_proj, "group", None)
        tp_rank, tp = (hc.rank(group), hc.world_size(group)) if group is not None else (0, 1)
        materialize_(model, LoraSource(None, seed=seed), tp_rank=tp_rank, tp_size=tp, device=base.device,
                     dtype=base.dtype, only=adapters)
    return len(adapters)


# ---- train.freeze -----------------------------------------------------------------------------------------

def _matches(pattern: str, name: str) -> bool:
    if pattern == "embeddings":
        return name.startswith("embed.")
    if pattern.startswith("layers.<"):
        n = int(pattern[len("layers.<"):])
        parts = name.split(".")
        return parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < n
    return fnmatch.fnmatchcase(name, pattern)


def apply_freeze(model: nn.Module, patterns: list[str]) -> int:
    """Freeze the parameters whose name matches any of ``patterns`` (train.freeze); returns how many. A pattern
    matching no parameter, or freezing everything, is a one-line ConfigError."""
    if not patterns:
        return 0
    named = list(model.named_parameters())
    layers = getattr(model, "layers", None)
    for pattern in patterns:
        if pattern.startswith("layers.<") and layers is not None and int(pattern[len("layers.<"):]) > len(layers):
            raise ConfigError(f"train.freeze: {pattern!r} names more blocks than the model's "
                              f"model.num_layers={len(layers)}; use at most 'layers.<{len(layers)}'")
        if not any(_matches(pattern, name) for name, _ in named):
            examples = ", ".join(name for name, _ in named[:3])
            raise ConfigError(f"train.freeze: pattern {pattern!r} matches no parameter (names look like {examples}; "
                              "or use 'embeddings', 'layers.<N')")
    frozen = 0
    for name, p in named:
        if any(_matches(pattern, name) for pattern in patterns):
            frozen += p.requires_grad
            p.requires_grad_(False)
    if not any(p.requires_grad for _, p in named):
        raise ConfigError(f"train.freeze={patterns} freezes every trainable parameter; nothing would train — "
                          "narrow the patterns")
    return frozen


def trainable_count(model: nn.Module) -> int:
    """Trainable elements of this rank's model (each tensor once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---- adapter state dicts: merge and export ---------------------------------------------------------------

def merge_lora_state(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """A full (logical) state dict with every adapter folded into its base weight, W + (alpha/r)·B A, and the
    adapter tensors removed; a state without adapters is returned as it is."""
    adapters = [k for k in state if k.endswith(".lora_A")]
    if not adapters:
        return state
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for a_name in adapters:
        prefix = a_name[: -len(".lora_A")]
        a, b = state[a_name].float(), state[prefix + ".lora_B"].float()  # (r, in), (out, r)
        w = state[prefix + ".weight"]
        merged[prefix + ".weight"] = (w.float() + lora.scale * (b @ a)).to(w.dtype)  # (out, in)
    return merged
