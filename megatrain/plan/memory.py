"""Per-rank memory of a training configuration, predicted from the config alone (Transformers).

Model states follow what DeepSpeed 0.19.8 allocates, measured by ``benchmarks/bench_memory.py`` (the table in
docs/parallelism.md), with ψ = the parameters a rank holds (``params.stage_params``), w = 4 bytes (fp32) or 2
(bf16/fp16), and dz = dp under ZeRO ≥ 1 (1 without ZeRO):

  weights   w·ψ (ZeRO-3: w·ψ/dp, plus the gathered working set, min(ψ, stage3_max_live_parameters)·w, in forward)
  master    4·ψt/dz: DeepSpeed's fp32 copy, kept from ZeRO-1 on even in fp32, and always in bf16/fp16
  Adam      8·ψt/dz (m and v)
  grads     w·ψt without ZeRO, w·ψt/dp with it

where ψt ≤ ψ are the trainable parameters: all of them, or with model.lora only the adapters and with
train.freeze all but the frozen ones (the optimizer gets only parameters with requires_grad).
  bucket    reduce_bucket_size·w (5·10⁸ elements by default, whatever the model): ZeRO-1/2 during each
            backward, ZeRO-3 from setup on

With the optimizer offloaded to CPU, master and Adam live in host memory. Activations are counted by a meta-device
forward (``activations.py``); a pipeline stage s keeps min(pp − s, micro-batches per step) of them in flight under
1F1B. ``reserved`` is what this does not model (CUDA context, NCCL buffers, allocator slack): an allowance, not a
measurement. The peak adds every term, as if all were live at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatrain.config.schema import Config
from megatrain.errors import UserError

GIB = 2**30
REDUCE_BUCKET_DEFAULT = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size
MAX_LIVE_DEFAULT = 1_000_000_000  # DeepSpeed's zero_optimization.stage3_max_live_parameters


@dataclass
class StageMemory:
    stage: int
    blocks: int
    params: int  # ψ on one rank of this stage
    trainable: int  # ψt: of those, the parameters with gradients and optimizer state
    weights: float  # bytes
    master: float
    adam: float
    grads: float
    bucket: float
    gathered: float  # ZeRO-3 weights gathered for the forward
    activations: float  # all micro-batches in flight on this stage
    in_flight: int
    reserved: float
    host: float  # bytes in CPU memory (offloaded optimizer state)

    @property
    def peak(self) -> float:
        return (self.weights + self.master + self.adam + self.grads + self.bucket + self.gathered
                + self.activations + self.reserved)


def plan_memory(cfg: Config, *, world_size: int) -> list[StageMemory]:
    """One row per pipeline stage (every tp and dp rank of a stage holds the same). Raises ValueError for
    configurations the planner does not model."""
    from megatrain.config import resolve_layout, to_deepspeed
    from megatrain.plan.activations import activation_bytes
    from megatrain.plan.params import stage_params
    m, par, t = cfg.model, cfg.parallel, cfg.train
    if not m.is_transformer:
        raise UserError(f"model.arch={m.arch}: the memory planner models Transformers (gpt2, llama)")
    if m.vocab_size <= 0:
        raise UserError("model.vocab_size is 0: set it, or plan after `launch/prepare.py` (it is read from the data)")
    lay = resolve_layout(cfg, world_size)
    z, dp = par.zero_stage, lay.dp
    w = 4 if t.precision == "fp32" else 2
    dz = dp if z >= 1 else 1
    zero_cfg = to_deepspeed(cfg, lay).get("zero_optimization", {})  # a user JSON may set the bucket sizes
    bucket_elems = float(zero_cfg.get("reduce_bucket_size", REDUCE_BUCKET_DEFAULT))
    max_live = float(zero_cfg.get("stage3_max_live_parameters", MAX_LIVE_DEFAULT))
    offload = par.offload_optimizer == "cpu"
    act = activation_bytes(m, micro_batch=lay.micro_batch_size, seq_len=cfg.seq_len, tp=lay.tp,
                           sequence_parallel=par.sequence_parallel,
                           dtype=torch.float32 if t.precision == "fp32" else torch.bfloat16,
                           repeat_kv=m.kernel_overrides.get("attention", m.kernels) == "torch")
    rows = []
    for sp in stage_params(m, tp=lay.tp, pp=lay.pp, partition=par.pipeline_partition, freeze=t.freeze):
        psi, psi_t = sp.numel, sp.trainable
        master = 4 * psi_t / dz if (z >= 1 or t.precision != "fp32") else 0.0
        adam = 8 * psi_t / dz
        blocks = sp.blocks
        if par.activation_checkpointing == "every":
            per_mb = blocks * act.checkpointed_block + (act.per_block if blocks else 0)
        elif par.activation_checkpointing == "every_n":
            ck = -(-blocks // par.checkpoint_every_n)  # blocks 0, n, 2n, ... (parallelize.activation_checkpointing)
            per_mb = ck * act.checkpointed_block + (blocks - ck) * act.per_block + (act.per_block if ck else 0)
        else:
            per_mb = blocks * act.per_block
        per_mb += (act.embed if "tokens" in sp.layers[:1] else 0) + (act.head if "lm head" in sp.layers else 0)
        in_flight = min(lay.pp - sp.stage, lay.grad_accum) if lay.pp > 1 else 1
        rows.append(StageMemory(
            stage=sp.stage, blocks=blocks, params=psi, trainable=psi_t,
            weights=w * psi / (dp if z == 3 else 1), master=0.0 if offload else master, adam=0.0 if offload else adam,
            grads=w * psi_t / (dp if z >= 1 else 1), bucket=bucket_elems * w if z >= 1 else 0.0,
            gathered=min(psi, max_live) * w if z == 3 else 0.0, activations=per_mb * in_flight, in_flight=in_flight,
            reserved=cfg.plan.reserved_gib * GIB, host=(master + adam) if offload else 0.0))
    return rows
