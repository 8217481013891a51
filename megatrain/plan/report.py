"""The planner's tables (markdown, so they paste into an issue or a PR)."""
from __future__ import annotations

from megatrain.config.schema import Config
from megatrain.plan.memory import GIB, StageMemory


def describe(cfg: Config, world: int) -> str:
    from megatrain.config import resolve_layout
    from megatrain.plan.params import meta_model
    lay, p = resolve_layout(cfg, world), cfg.parallel
    n = meta_model(cfg.model).num_params()
    return (f"plan: {cfg.model.hf_family} {n / 1e9:.3g}B params | world {world} = tp {lay.tp} x pp {lay.pp} x dp {lay.dp}"
            f"{' +sp' if p.sequence_parallel else ''} | zero {p.zero_stage}"
            f"{' (optimizer on cpu)' if p.offload_optimizer == 'cpu' else ''} | {cfg.train.precision} | "
            f"micro-batch {lay.micro_batch_size} x seq {cfg.seq_len}, {lay.grad_accum} per step | "
            f"activation checkpointing {p.activation_checkpointing}")


def stage_table(rows: list[StageMemory]) -> str:
    head = ("| stage | blocks | params/rank | weights | master | Adam | grads | buckets | activations | reserved | "
            "peak GiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        g = [f"{x / GIB:.2f}" for x in (r.weights, r.master, r.adam, r.grads, r.bucket + r.gathered)]
        trains = "" if r.trainable == r.params else f" ({r.trainable:,} train)"
        lines.append(f"| {r.stage} | {r.blocks} | {r.params:,}{trains} | " + " | ".join(g) +
                     f" | {r.activations / GIB:.2f} ({r.in_flight} in flight) | {r.reserved / GIB:.2f} | "
                     f"**{r.peak / GIB:.2f}** |")
    if any(r.host for r in rows):
        lines.append(f"\noffloaded optimizer state in host memory per rank: {max(r.host for r in rows) / GIB:.2f} GiB")
    return "\n".join(lines)


def layout_table(cands: list[tuple[Config, float]], world: int) -> str:
    if not cands:
        return "(none)"
    lines = ["| tp | pp | dp | sp | zero | activation checkpointing | peak GiB |", "|---:|---:|---:|---|---:|---|---:|"]
    for c, peak in cands:
        p = c.parallel
        lines.append(f"| {p.tp} | {p.pp} | {world // (p.tp * p.pp)} | {'yes' if p.sequence_parallel else 'no'} | "
                     f"{p.zero_stage} | {p.activation_checkpointing} | {peak / GIB:.2f} |")
    return "\n".join(lines)
