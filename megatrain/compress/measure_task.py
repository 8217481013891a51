"""The compression table for any task (ResNet / RNN classifiers, RNN LMs): params, training FLOPs per item,
measured items/s and validation metrics, each row measured the same way on the plain model in this process.

Items are what the task's ``items_in`` counts: samples for classification, tokens for language modelling.
FLOPs per item are training FLOPs (forward + backward = 3 × forward, 2 per multiply-add, i.e. 6 × MACs, the
PaLM convention of the Transformer table) counted on a real micro-batch: convolutions and linear layers from
their output shapes, LSTM/GRU layers from their gate matrices (G·H·(in + H) MACs per token, layer and
direction). Norms, activations and pooling are not counted. Items/s: forward + backward of one micro-batch,
after one warm-up, the fastest of ``prune.measure_batches`` repetitions. Validation: the task's own metrics
over the first ``train.eval_batches`` micro-batches of the validation split (0 = all of it).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.data import default_collate

from megatrain.config.schema import Config, ModelConfig
from megatrain.data.sampler import eval_batch_count
from megatrain.distributed.env import device as current_device


def batch_of(dataset, start: int, n: int, dev) -> dict:
    """Samples [start, start + n) collated on ``dev`` (indices wrap around the dataset)."""
    idx = [i % len(dataset) for i in range(start, start + n)]
    return {k: v.to(dev) for k, v in default_collate([dataset[i] for i in idx]).items()}


def _rnn_macs_per_token(rnn: nn.RNNBase) -> int:
    gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
    dirs, h = 2 if rnn.bidirectional else 1, rnn.hidden_size
    total, width_in = 0, rnn.input_size
    for _ in range(rnn.num_layers):
        total += dirs * gates * h * (width_in + h)
        width_in = dirs * h
    return total


@torch.no_grad()
def forward_macs(model: nn.Module, run) -> int:
    """Multiply-adds of the conv / linear / RNN layers during ``run()`` (one forward)."""
    total = 0

    def count(mod, args, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):  # out (B, C_out, H', W'): each element is C_in/groups·kh·kw MACs
            total += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):  # out (..., out_features)
            total += out.numel() * mod.in_features
        elif isinstance(mod, nn.RNNBase):
            x = args[0]
            tokens = x.data.shape[0] if isinstance(x, PackedSequence) else x.shape[0] * x.shape[1]
            total += tokens * _rnn_macs_per_token(mod)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear,
                                                                                       nn.RNNBase))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return total


def fastest_step_s(model: nn.Module, step, *, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``step()`` (a training forward + backward) after one
    warm-up; gradients are dropped afterwards."""
    dev = current_device()
    model.train()
    times = []
    for r in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if r:  # the first pass is a warm-up (allocator, kernel selection)
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    # The fastest repetition: on a shared machine the slower ones measure the neighbours, not the model.
    return min(times)


def items_per_s(model: nn.Module, task, batch: dict, *, repeats: int) -> float:
    """Training throughput of forward + backward on one micro-batch (one process)."""
    return task.items_in(batch) / fastest_step_s(model, lambda: task.loss_and_stats(model, batch)[0].backward(),
                                                 repeats=repeats)


@torch.no_grad()
def validate(model: nn.Module, task, dataset, *, micro_batch_size: int, num_batches: int) -> dict[str, float]:
    """The task's metrics (loss, accuracy, ...) over the first num_batches micro-batches (0 = all), eval mode."""
    dev = current_device()
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for b in range(eval_batch_count(num_batches, len(dataset), micro_batch_size=micro_batch_size)):
        if b * micro_batch_size >= len(dataset):
            break
        n = min(micro_batch_size, len(dataset) - b * micro_batch_size)  # the tail batch does not wrap around
        _, stats = task.loss_and_stats(model, batch_of(dataset, b * micro_batch_size, n, dev))
        for k, v in stats.items():
            totals[k] = totals[k] + v.double() if k in totals else v.double()
    return task.summarize(totals)


def widths_of(m: ModelConfig) -> str:
    return "/".join(map(str, m.stage_inner_widths)) if m.arch == "resnet" else str(m.rnn_width)


def measure_task(name: str, model: nn.Module, model_cfg: ModelConfig, cfg: Config, task, val_data) -> dict:
    dev = current_device()
    model.to(dev)
    mb = cfg.train.micro_batch_size
    batch = batch_of(val_data, 0, mb, dev)
    model.eval()
    macs = forward_macs(model, lambda: task.loss_and_stats(model, batch))
    metrics = validate(model, task, val_data, micro_batch_size=mb, num_batches=cfg.train.eval_batches)
    row = {"model": name, "widths": widths_of(model_cfg),
           "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
           "unit": "token" if model_cfg.task == "language_modeling" else "sample",
           "flops_per_item": 6.0 * macs / task.items_in(batch),
           "items_per_s": items_per_s(model, task, batch, repeats=cfg.prune.measure_batches),
           "val_loss": metrics["loss"]}
    if "accuracy" in metrics:
        row["val_accuracy"] = metrics["accuracy"]
    return row


def markdown_task(rows: list[dict]) -> str:
    unit = rows[0]["unit"]
    acc = all("val_accuracy" in r for r in rows)
    head = f"| model | pruned widths | params | MFLOPs/{unit} | {unit}s/s | val loss |" + (" val accuracy |" if acc else "")
    lines = [head, "|---|---|---:|---:|---:|---:|" + ("---:|" if acc else "")]
    for r in rows:
        line = (f"| {r['model']} | {r['widths']} | {r['params']:,} | {r['flops_per_item'] / 1e6:.3f} | "
                f"{r['items_per_s']:,.0f} | {r['val_loss']:.4f} |")
        lines.append(line + (f" {r['val_accuracy']:.4f} |" if acc else ""))
    return "\n".join(lines) + "\n"
