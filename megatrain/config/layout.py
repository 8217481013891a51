"""Derived values computed in one place: data-parallel size, gradient accumulation, and the rules a
layout must satisfy. Runs before any process group exists so a bad layout fails in the launcher."""
from __future__ import annotations

from dataclasses import dataclass

from megatrain.config.loader import ConfigError
from megatrain.config.schema import Config


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int  # micro-batches per rank per optimizer step (= pipeline micro-batches when pp > 1)

    def describe(self) -> str:
        return (f"world={self.world_size} tp={self.tp} pp={self.pp} dp={self.dp} micro={self.micro_batch_size} "
                f"accum={self.grad_accum} global={self.global_batch_size}")


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """Check ``cfg`` against ``world_size`` and derive dp and gradient accumulation."""
    par, train, model = cfg.parallel, cfg.train, cfg.model
    mp = par.tp * par.pp
    if world_size % mp:
        raise ConfigError(f"parallel.tp*parallel.pp={mp} does not divide world size {world_size}; "
                          f"launch a multiple of {mp} ranks or change tp/pp")
    dp = world_size // mp
    if par.dp is not None and par.dp != dp:
        raise ConfigError(f"parallel.dp={par.dp} but world size {world_size} / (tp*pp={mp}) = {dp}; "
                          "drop parallel.dp or launch tp*pp*dp ranks")
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                          f"micro_batch_size*dp={train.micro_batch_size}*{dp}; make it a multiple of {per_step}")
    accum = train.global_batch_size // per_step
    if (par.tp > 1 or par.pp > 1) and not model.is_transformer:
        raise ConfigError(f"parallel.tp/pp > 1 needs a Transformer (model.arch={model.arch}); use tp=1 pp=1")
    if model.is_transformer:
        if model.num_heads % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} does not divide model.num_heads={model.num_heads}; "
                              "choose tp dividing the head count")
        # any kv-head count works: tp splits, replicates or keeps whole the kv heads (parallelize.tensor_parallel)
        if model.ffn_size % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} does not divide the MLP width {model.ffn_size}; "
                              "set model.ffn_hidden_size to a multiple of tp")
        if par.pp > model.num_layers:
            raise ConfigError(f"parallel.pp={par.pp} exceeds model.num_layers={model.num_layers}; "
                              "use at most one stage per layer")
    if par.pp > 1 and par.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={par.zero_stage} with pp={par.pp}: DeepSpeed's pipeline engine "
                          "supports only ZeRO-0/1; set parallel.zero_stage=1")
    if par.pp > 1 and accum < par.pp:
        raise ConfigError(f"pipeline with pp={par.pp} stages gets only {accum} micro-batches per step; raise "
                          f"train.global_batch_size to at least {par.pp * per_step} or lower micro_batch_size")
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp>1; enable tp or turn it off")
    if par.sequence_parallel and cfg.seq_len % par.tp:
        raise ConfigError(f"sequence parallel: seq_len={cfg.seq_len} is not divisible by tp={par.tp}; "
                          "choose data.seq_len as a multiple of tp")
    if par.offload_optimizer != "none" and par.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer=cpu needs parallel.zero_stage>=1; set zero_stage=1, 2 or 3")
    return Layout(world_size, par.tp, par.pp, dp, train.micro_batch_size, train.global_batch_size, accum)
