"""The one place where transforms are applied, in the documented order."""
from __future__ import annotations

from torch import nn

from megatrain import ops
from megatrain.config.schema import Config
from megatrain.parallelize.activation_checkpointing import apply_activation_checkpointing


def parallelize(model: nn.Module, cfg: Config, dims, *, loss_fn=None) -> nn.Module:
    """Return the model ready for DeepSpeed: kernels chosen, sharded over ``dims``, checkpointed.

    1. kernels: the process-wide op backends from model.kernels / kernel_overrides;
    2. tensor (+ sequence) parallel over dims.tp_group;
    3. activation checkpointing of the blocks (per block, so it holds inside pipeline stages too);
    4. pipeline split over dims (DeepSpeed PipelineModule, computing ``loss_fn`` on the last stage) when pp > 1;
    ZeRO partitioning over dims.dp_group is DeepSpeed's, at deepspeed.initialize.
    """
    ops.configure(cfg.model.kernels, cfg.model.kernel_overrides)
    if dims is not None and dims.tp > 1:
        from megatrain.parallelize.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, cfg, dims)
    blocks = getattr(model, "layers", None)
    if blocks is not None:
        apply_activation_checkpointing(blocks, mode=cfg.parallel.activation_checkpointing,
                                       every_n=cfg.parallel.checkpoint_every_n)
    if dims is not None and dims.pp > 1:
        from megatrain.parallelize.pipeline import to_pipeline_module
        model = to_pipeline_module(model, cfg, dims, loss_fn)
    return model
