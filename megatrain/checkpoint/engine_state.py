"""Moving training state between a DeepSpeed engine (any ZeRO stage, tp, pp) and logical tensors.

Parameters and Adam moments are read through DeepSpeed's ``safe_get_full_*`` (which gathers ZeRO
partitions over data parallel) and then gathered over tensor parallel with the parameter's shard tags;
loading slices the logical tensor for this rank and writes it back through ``safe_set_full_*``.
Without ZeRO partitioning (stage 0), the torch optimizer's state is used directly.
"""
from __future__ import annotations

import torch
from torch import nn

from megatrain.parallelize.param_spec import spec_of
from megatrain.parallelize.shards import gather_logical, local_shape, shard_of

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam(W)
SGD_MOMENTS = ("momentum_buffer",)


def moment_keys(engine) -> tuple[str, ...]:
    """The per-parameter optimizer state a checkpoint must hold to resume exactly: Adam's two moments, SGD's
    momentum buffer (none without momentum)."""
    group = inner_optimizer(engine).param_groups[0]
    if "betas" in group:
        return MOMENTS
    return SGD_MOMENTS if group.get("momentum", 0) else ()


def has_state(engine) -> bool:
    """False before the first optimizer step (or when every step so far overflowed): no moments exist yet."""
    return any(state for state in inner_optimizer(engine).state.values())


def inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def local_parameters(module: nn.Module) -> list[nn.Parameter]:
    """This rank's parameters with a logical name, each once, in module order (identical across the
    ranks of a stage, so collectives inside the loops line up)."""
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen and spec_of(p) is not None:
            seen.add(id(p))
            out.append(p)
    return out


def _full_local(p, engine, key: str | None, *, stepped: bool = True) -> torch.Tensor:
    """The tp-local, dp-complete fp32 value of ``p`` (key None) or of its optimizer state ``key`` (zeros when
    the optimizer has not ``stepped`` yet: that is the state a fresh optimizer starts from)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if key is not None and not stepped:
        return torch.zeros(local_shape(p))
    if not p.requires_grad:  # frozen (LoRA base, train.freeze): no fp32 master, no optimizer state
        return _frozen_value(p)
    value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if value is not None:
        return value.detach().float().cpu().reshape(local_shape(p))
    if key is None:
        return p.detach().float().cpu()
    state = inner_optimizer(engine).state.get(p, {})
    return state[key].detach().float().cpu() if key in state else torch.zeros(local_shape(p))


def _frozen_value(p) -> torch.Tensor:
    """A frozen parameter's tp-local value: the module's own tensor (gathered over dp under ZeRO-3)."""
    if hasattr(p, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().cpu().clone().reshape(local_shape(p))
    return p.detach().float().cpu()


def optimizer_step_count(engine) -> int:
    for state in inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def gather_state(engine, dims, *, with_optimizer: bool = True):
    """Yield (logical name, fp32 param, {moment: tensor}) for every local parameter; all ranks of the
    stage must iterate it together (it contains dp and tp collectives)."""
    tp_group, tp = (dims.tp_group, dims.tp) if dims is not None else (None, 1)
    # every rank of the stage decides alike: after a step all of them hold state (ZeRO partitions included)
    stepped = with_optimizer and has_state(engine)
    if stepped:
        relink_optimizer_state(engine)
    keys = moment_keys(engine) if with_optimizer else ()
    for p in local_parameters(engine.module):
        value = gather_logical(_full_local(p, engine, None), p, tp_group, tp)
        moments = {}
        for key in keys if p.requires_grad else ():  # a frozen parameter has no optimizer state to save
            moments[key] = gather_logical(_full_local(p, engine, key, stepped=stepped), p, tp_group, tp)
        yield p, value, moments


def _ensure_optimizer_state(engine, step: int) -> None:
    """Optimizer states exist only after a first step; create them (zeros; Adam's with the given step) so they
    can be set. A zero SGD momentum buffer steps exactly like torch's first-step ``buf = grad`` (dampening 0)."""
    inner = inner_optimizer(engine)
    keys = moment_keys(engine)
    flat = [q for group in inner.param_groups for q in group["params"]]
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3 / ZeRO-1,2 masters
        flat += [q for q in getattr(engine.optimizer, attr, []) if all(q is not f for f in flat)]
    for q in flat:
        state = inner.state[q]
        for key in keys:
            if state.get(key) is None:
                state[key] = torch.zeros_like(q, memory_format=torch.preserve_format)
        if keys == MOMENTS:
            state["step"] = torch.tensor(float(step))
    relink_optimizer_state(engine)


def relink_optimizer_state(engine) -> None:
    """Point every parameter's ZeRO-1/2 / bf16 fragment mapping at the current optimizer state.

    DeepSpeed links them once, right after the first step of the *first* param group, so groups stepped
    later (our no-decay group) stay unlinked; relinking when all states exist fixes that."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(engine, dims, source, *, step: int) -> None:
    """Set fp32 master weights and Adam moments of every local parameter from ``source`` (logical
    tensors named ``<name>`` and ``<name>.<moment>``), resharded for this rank's layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    tp_rank, tp = (dims.tp_rank, dims.tp) if dims is not None else (0, 1)
    _ensure_optimizer_state(engine, step)
    inner = inner_optimizer(engine)
    keys = moment_keys(engine)
    for p in local_parameters(engine.module):
        if not p.requires_grad:  # frozen: its value came with the weights, it has no master or moments
            continue
        name = spec_of(p).logical_name
        master = shard_of(source.model.tensor(name).float(), p, tp_rank, tp).reshape(local_shape(p))
        safe_set_full_fp32_param(p, master.to(p.device))  # exact fp32 master under bf16/fp16 (no-op at ZeRO-0)
        for key in keys:
            value = shard_of(source.optim.tensor(f"{name}.{key}").float(), p, tp_rank, tp).reshape(local_shape(p))
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                inner.state[p][key].copy_(value.to(inner.state[p][key]))
