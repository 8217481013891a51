"""The prune pass for ResNets and LSTM/GRU models: load → (score → prune → fine-tune)×n → save → table.

The same flow as the Transformer pass (passes.run_prune), through the config's own task (classification or
language modelling, megatrain/train/tasks.py) instead of the LM task: its loss drives Taylor importance, its
datasets calibrate and fine-tune, its metrics fill the table. These models are not tensor-parallel, so the
model is scored unsharded on every rank (data-dependent scores summed over dp) and fine-tuned under the
normal Trainer with any dp layout and ZeRO stage (passes._train: weights and BatchNorm statistics come back
from the engine).
"""
from __future__ import annotations

import os

import torch

from megatrain.weights.sources import load_model, save_model
from megatrain.compress.measure_task import markdown_task, measure_task
from megatrain.compress.passes import GivenModelTask, _calibration, _setup, _train, with_fields
from megatrain.compress.prune_channels import (channel_scores, channel_sizes, prune_channels, step_channel_sizes,
                                               target_channel_sizes)
from megatrain.compress.report import write_table
from megatrain.config.schema import Config, ModelConfig
from megatrain.distributed.env import is_main_process
from megatrain.train.tasks import make_task
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc


def _source_model(cfg: Config, task) -> tuple[torch.nn.Module, ModelConfig]:
    path = cfg.prune.source
    if not path:
        return task.build_model(), cfg.model
    model, model_cfg = load_model(path)
    for field in ("arch", "task", "vocab_size", "num_classes"):
        mine, theirs = getattr(cfg.model, field), getattr(model_cfg, field)
        if field == "vocab_size" and cfg.model.arch == "resnet":
            continue
        if mine != theirs:
            raise UserError(f"prune.source={path} has model.{field}={theirs} but the config (and its data) has "
                             f"{mine}; use the recipe and data the model was trained with")
    return model, model_cfg


def run_prune_channels(cfg: Config, *, local_rank: int | None = None) -> list[dict]:
    """Prune the inner channels of a ResNet / hidden units of an RNN to prune.channels; returns the rows."""
    from megatrain.distributed.env import device
    p = cfg.prune
    task = make_task(cfg)  # fills model.vocab_size (RNNs) from the data
    model, model_cfg = _source_model(cfg, task)
    cfg = with_fields(cfg, model=model_cfg)
    start, target = channel_sizes(model_cfg), target_channel_sizes(model_cfg, p, tp=cfg.parallel.tp)
    lay, dims = _setup(cfg, local_rank)
    task = make_task(cfg)
    val, train = task.val_dataset() or task.train_dataset(), task.train_dataset()
    rows = [measure_task("original", model, model_cfg, cfg, task, val)]
    steps = p.iterations if p.schedule == "iterative" else 1
    batches = _calibration(cfg, lay, dims, train) if p.importance in ("taylor", "activation") else []
    dp_group = dims.dp_group if dims.dp > 1 else None

    def loss_fn(m, b):  # the current step's task (its config has the current sizes)
        return task.loss_and_stats(m, b)[0]

    for i in range(1, steps + 1):
        new = step_channel_sizes(start, target, i, steps)
        scores = channel_scores(p.importance, model.to(device()), model_cfg, batches, loss_fn, dp_group=dp_group)
        model, model_cfg = prune_channels(model, model_cfg, scores, new)
        cfg = with_fields(cfg, model=model_cfg)
        task = make_task(cfg)
        if i == steps:
            rows.append(measure_task("pruned", model, model_cfg, cfg, task, val))
        if p.finetune_steps:
            log_dir = os.path.join(cfg.log.dir, "prune", f"finetune_{i}")
            model = _train(cfg, GivenModelTask(task, model.cpu()), model_cfg, log_dir, p.finetune_steps)
    if p.finetune_steps:
        rows.append(measure_task("pruned + fine-tuned", model, model_cfg, cfg, task, val))
    out = p.out or os.path.join(cfg.log.dir, "pruned")
    if is_main_process():
        save_model(out, model.cpu(), model_cfg, extra={"pruned_from": p.source, "prune": p.model_dump(mode="json")})
        print(write_table(rows, out, "prune", render=markdown_task), flush=True)
    hc.barrier()
    return rows
