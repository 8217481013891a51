"""What the Trainer needs from a workload: a model, datasets, and a loss with summable statistics.

The Trainer is task-agnostic: language modelling (Transformers, RNN LMs) and classification (CNN, RNN)
plug in through this protocol, so every task gets DeepSpeed, ZeRO, mixed precision, checkpointing,
logging and evaluation unchanged. Statistics are *sums* (loss·count, count, correct, confusion counts)
so they aggregate exactly across data-parallel ranks and micro-batches (sum the counts, not averages).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


class Task(Protocol):
    def build_model(self) -> nn.Module:
        """The unsharded model (pure architecture), initialised from the config seed."""

    def train_dataset(self) -> Dataset:
        """Map-style dataset; each item is a dict of tensors (collated by default_collate)."""

    def val_dataset(self) -> Dataset | None:
        """Validation split, or None."""

    def loss_and_stats(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss for backward and detached *summable* statistics (e.g. loss_sum, count, correct)."""

    def summarize(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Turn summed statistics into metrics (loss, perplexity, accuracy, f1_macro, ...)."""

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens (LM) or samples (classification) in a batch, for throughput."""

    # Optional, loss normalisation over the global batch (docs/training.md):
    #   loss_terms(batch) -> int: the loss terms (label tokens) of a host-side batch. With it the trainer gives
    #   every micro-batch batch["loss_divisor"] = (the step's terms over all micro-batches and dp ranks) /
    #   (grad_accum · dp), and the task's loss must be its sum divided by that (LanguageModelingTask does).
    # Optional, for pipeline parallelism (pp > 1), where DeepSpeed computes the loss on the last stage from
    # (outputs, labels) only. Without them the labels are batch["labels"] and the loss is loss_from_logits.
    #   pipeline_labels(batch) -> Tensor | tuple[Tensor, ...]: what travels to the last stage as labels
    #   pipeline_loss(outputs, labels) -> Tensor: the mean loss from those labels
