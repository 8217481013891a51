"""The one place where transforms are applied, in the documented order."""
from __future__ import annotations

import torch
from torch import nn

from megatrain.ops.dispatch import policy_from_config
from megatrain.ops.kernels import Kernels, use_kernels
from megatrain.config.schema import Config
from megatrain.parallelize.activation_checkpointing import apply_activation_checkpointing
from megatrain.parallelize.lora import LoraSource, apply_freeze, apply_lora
from megatrain.parallelize.materialize import InitSource, load_buffers_, materialize_, placeholders_
from megatrain.parallelize.param_spec import tag_logical_names
from megatrain.parallelize.sequence_parallel import register_sequence_parallel_hooks


def parallelize(model: nn.Module, cfg: Config, dims, *, loss_fn=None, source=None, device=None) -> nn.Module:
    """Return the model ready for DeepSpeed: kernels chosen, sharded over ``dims``, checkpointed, real.

    0. every parameter is tagged with its logical (unsharded) name and shape;
    1. kernels: every module that calls ops gets the run's Kernels (the KernelPolicy of model.kernels /
       kernel_overrides), passed in rather than set process-wide;
    2. tensor (+ sequence) parallel over dims.tp_group — on meta tensors when the model was built on meta;
    2b. LoRA adapters (model.lora, sharded like their base layers; the base frozen) and train.freeze, on the
       whole model so every pattern is checked against every name;
    3. activation checkpointing of the blocks (per block, so it holds inside pipeline stages too);
    4. pipeline split over dims (DeepSpeed PipelineModule, computing ``loss_fn`` on the last stage) when pp > 1;
    5. materialisation of the parameters this rank keeps, from ``source`` (a checkpoint, a saved model dir or a
       Hugging Face directory) or the name-seeded init — one logical tensor at a time; saved buffers
       (BatchNorm statistics) are copied too;
    ZeRO partitioning over dims.dp_group is DeepSpeed's, at deepspeed.initialize.
    """
    tag_logical_names(model)
    use_kernels(model, Kernels(policy_from_config(cfg.model)))  # this model's policy; nothing process-wide
    if dims is not None and dims.tp > 1:
        from megatrain.parallelize.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, cfg, dims)
    lora = cfg.model.lora
    if lora.enabled:
        apply_lora(model, lora, seed=cfg.train.seed)
    apply_freeze(model, cfg.train.freeze)
    blocks = getattr(model, "layers", None)
    if blocks is not None:
        apply_activation_checkpointing(blocks, mode=cfg.parallel.activation_checkpointing,
                                       every_n=cfg.parallel.checkpoint_every_n)
    on_meta = any(p.is_meta for p in model.parameters())
    overwrite = source is not None and not on_meta
    if on_meta or source is not None:
        source = source or InitSource(seed=cfg.train.seed, std=cfg.model.init_std, num_layers=cfg.model.num_layers)
        if lora.enabled:
            source = LoraSource(source, seed=cfg.train.seed)  # the adapters: from a LoRA checkpoint, else fresh
    tp_rank, tp_size = (dims.tp_rank, dims.tp) if dims is not None else (0, 1)
    fill = dict(tp_rank=tp_rank, tp_size=tp_size, device=device or torch.device("cpu"), overwrite=overwrite)
    if dims is not None and dims.pp > 1:
        from megatrain.parallelize.pipeline import to_pipeline_module
        if on_meta:
            if cfg.model.tied:  # PipelineModule broadcasts the tied table between stages while it is built
                materialize_(model, source, only=[model.embed.wte.weight], **fill)
            placeholders_(model)  # stages are cut by parameter count; only the kept layers get memory
        model = to_pipeline_module(model, cfg, dims, loss_fn)
    if source is not None:
        materialize_(model, source, **fill)
        load_buffers_(model, source)
    register_sequence_parallel_hooks(model)
    return model
