"""The compression table: parameters, FLOPs/token, measured tokens/s and validation loss per model.

Every row is measured the same way, on the plain (unsharded) model in this process, so rows are comparable:
validation loss over the first ``train.eval_batches`` micro-batches of the validation split; tokens/s of a
training forward + backward (no optimizer) on one micro-batch, after one warm-up, the fastest of
``prune.measure_batches`` repetitions; FLOPs/token from ``flops_per_token`` (training, PaLM convention) of
the model's config.
"""
from __future__ import annotations

import json
import os

import torch

from megatrain.compress.measure_task import batch_of, fastest_step_s
from megatrain.config.schema import Config, ModelConfig
from megatrain.distributed.env import device as current_device
from megatrain.fsutil import atomic_write_text
from megatrain.models.transformer import flops_per_token


@torch.no_grad()
def val_loss(model: torch.nn.Module, dataset, *, micro_batch_size: int, num_batches: int) -> float:
    """Token-weighted mean next-token CE over the first num_batches micro-batches (0 = all; one process,
    plain model)."""
    from megatrain.data.sampler import eval_batch_count
    dev = current_device()
    model.eval()
    total, count = 0.0, 0
    for b in range(eval_batch_count(num_batches, len(dataset), micro_batch_size=micro_batch_size)):
        if b * micro_batch_size >= len(dataset):
            break
        batch = batch_of(dataset, b * micro_batch_size, micro_batch_size, dev)
        logits = model(batch["input_ids"]).float()  # (B, T, V)
        labels = batch["labels"].reshape(-1)
        n = int((labels != -100).sum())
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels,
                                                   reduction="sum").item()
        count += n
    return total / max(count, 1)


def tokens_per_s(model: torch.nn.Module, dataset, *, micro_batch_size: int, repeats: int) -> float:
    """Training throughput of forward + backward on one micro-batch (one process)."""
    batch = batch_of(dataset, 0, micro_batch_size, current_device())

    def step():
        logits = model(batch["input_ids"])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                          batch["labels"].reshape(-1)).backward()
    return batch["input_ids"].numel() / fastest_step_s(model, step, repeats=repeats)


def measure(name: str, model: torch.nn.Module, model_cfg: ModelConfig, cfg: Config, val_data) -> dict:
    dev = current_device()
    model.to(dev)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    row = {"model": name, "params": params, "flops_per_token": flops_per_token(model_cfg, cfg.seq_len),
           "num_layers": model_cfg.num_layers, "num_heads": model_cfg.num_heads, "ffn": model_cfg.ffn_size}
    mb = cfg.train.micro_batch_size
    row["tokens_per_s"] = tokens_per_s(model, val_data, micro_batch_size=mb, repeats=cfg.prune.measure_batches)
    row["val_loss"] = val_loss(model, val_data, micro_batch_size=mb, num_batches=cfg.train.eval_batches)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | heads | ffn | params | MFLOPs/token | tokens/s | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['num_layers']} | {r['num_heads']} | {r['ffn']} | {r['params']:,} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir: str, name: str = "compression", *, render=markdown) -> str:
    """Write <out_dir>/<name>.md (``render(rows)``) and .json; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    md = render(rows)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), md)
    atomic_write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(rows, indent=1))
    return md
