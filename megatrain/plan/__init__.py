"""Preflight planner: per-rank memory of a configuration from the config alone, a refusal before any process group
or GPU is touched when it does not fit, and the layouts that would (``launch/plan.py``; docs/planner.md).

Parameters per rank are exact (tested against the engines); model states and DeepSpeed's buckets follow the
measured table in docs/parallelism.md; activations come from a meta-device forward. What is not modelled is an
explicit allowance, ``plan.reserved_gib``.
"""
from __future__ import annotations

import itertools

from megatrain.config.schema import Config
from megatrain.plan.memory import GIB, StageMemory, plan_memory
from megatrain.errors import UserError

__all__ = ["GIB", "StageMemory", "plan_memory", "check_fits", "memory_preflight", "propose", "with_vocab",
           "planned_world_size"]


def planned_world_size(cfg: Config) -> int:
    from megatrain.config.preflight import launched_world_size
    return cfg.plan.world_size or launched_world_size()


def with_vocab(cfg: Config) -> Config:
    """``cfg`` with model.vocab_size read from the prepared data when the config leaves it 0."""
    if cfg.model.vocab_size or not cfg.model.is_transformer:
        return cfg
    from megatrain.train.lm_task import read_vocab_size
    try:
        vocab = read_vocab_size(cfg.data.path)
    except (OSError, ValueError, KeyError):
        raise UserError(f"model.vocab_size is 0 and data.path={cfg.data.path} has no prepared data to read it from; "
                         "set --model.vocab_size or run launch/prepare.py first") from None
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": vocab})})


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _layout_args(cfg: Config) -> str:
    p = cfg.parallel
    out = f"--parallel.tp={p.tp} --parallel.pp={p.pp} --parallel.zero_stage={p.zero_stage}"
    if p.sequence_parallel:
        out += " --parallel.sequence_parallel=true"
    if p.activation_checkpointing != "none":
        out += f" --parallel.activation_checkpointing={p.activation_checkpointing}"
    return out


def memory_preflight(cfg: Config, world_size: int) -> None:
    """The launchers' preflight: with ``plan.gpu_memory_gib`` set, refuse (one line) a layout predicted not to fit,
    before any process group or GPU is touched."""
    if cfg.plan.gpu_memory_gib:
        check_fits(with_vocab(cfg), world_size=world_size)


def check_fits(cfg: Config, *, world_size: int, rows: list[StageMemory] | None = None) -> list[StageMemory]:
    """The plan (``rows`` if already computed), or ValueError (one line: the predicted peak, the budget and a
    layout that fits, if any)."""
    rows = rows if rows is not None else plan_memory(cfg, world_size=world_size)
    budget = cfg.plan.gpu_memory_gib
    worst = max(rows, key=lambda r: r.peak)
    if budget is None or worst.peak <= budget * GIB:
        return rows
    fits = propose(cfg, world_size=world_size, limit=1)
    hint = (f"; a layout that fits: {_layout_args(fits[0][0])} (peak {_gib(fits[0][1])} GiB)" if fits else
            "; no tp/pp/ZeRO/checkpointing layout of this world size fits: add GPUs or shrink "
            "train.micro_batch_size / data.seq_len")
    raise UserError(f"plan.gpu_memory_gib={budget:g}: predicted peak {_gib(worst.peak)} GiB on pipeline stage "
                     f"{worst.stage} (weights {_gib(worst.weights)}, optimizer {_gib(worst.master + worst.adam)}, grads "
                     f"{_gib(worst.grads)}, buckets {_gib(worst.bucket + worst.gathered)}, activations "
                     f"{_gib(worst.activations)}, reserved {_gib(worst.reserved)}){hint}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def propose(cfg: Config, *, world_size: int, limit: int | None = None) -> list[tuple[Config, float]]:
    """Layouts of ``world_size`` ranks that fit ``plan.gpu_memory_gib`` (all valid ones without a budget), cheapest
    first: no recomputation before recomputation, then smaller tp (a collective per layer), smaller pp (the
    bubble), lower ZeRO stage (ZeRO-3 adds parameter all-gathers), sequence parallelism off before on."""
    from megatrain.config import resolve_layout
    m, budget = cfg.model, cfg.plan.gpu_memory_gib
    out = []
    for ckpt, tp, pp, zero, sp in itertools.product(("none", "every"), _divisors(world_size), _divisors(world_size),
                                                    (0, 1, 2, 3), (False, True)):
        if world_size % (tp * pp) or tp > 8 or pp > m.num_layers or (sp and tp == 1) or (pp > 1 and zero > 1):
            continue
        if m.num_heads % tp or m.ffn_size % tp:
            continue
        par = cfg.parallel.model_copy(update={"tp": tp, "pp": pp, "zero_stage": zero, "sequence_parallel": sp,
                                              "activation_checkpointing": ckpt, "dp": None})
        cand = cfg.model_copy(update={"parallel": par})
        try:
            resolve_layout(cand, world_size)
            peak = max(r.peak for r in plan_memory(cand, world_size=world_size))
        except ValueError:
            continue
        if budget is None or peak <= budget * GIB:
            out.append((cand, peak))
            if limit and len(out) >= limit:
                break
    return out
