"""Classification and language-model metrics built from *summed* statistics.

Every metric here is a function of counts (loss sum, sample count, confusion matrix), so data-parallel ranks
and micro-batches combine exactly by adding counts (:func:`all_reduce_stats`); averaging per-rank accuracies
or F1s would weight ranks wrongly whenever their batch sizes or class mixes differ.

Macro averages follow scikit-learn's default: they run over the classes that occur in the labels or in the
predictions (a class absent from both has no precision or recall to average), and a 0/0 precision, recall or
F1 counts as 0 (scikit-learn's ``zero_division`` fallback).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) predictions and labels -> (C, C) int64 counts; row = true class, column = predicted class."""
    if preds.shape != labels.shape:
        raise UserError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    idx = labels.long().reshape(-1) * num_classes + preds.long().reshape(-1)  # (N,)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and precision/recall/F1 (macro and micro) from a (C, C) confusion matrix."""
    cm = confusion.double()
    total = cm.sum()
    if total == 0:
        raise UserError("confusion matrix is empty; evaluate on at least one sample")
    tp = cm.diagonal()  # (C,)
    pred_pos = cm.sum(0)  # (C,) predicted as class c
    true_pos = cm.sum(1)  # (C,) truly class c
    precision = torch.where(pred_pos > 0, tp / pred_pos.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true_pos > 0, tp / true_pos.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    present = (pred_pos + true_pos) > 0
    accuracy = float(tp.sum() / total)
    # Single-label multi-class: micro precision = micro recall = micro F1 = accuracy (every error is one FP and one FN).
    return {
        "accuracy": accuracy,
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "precision_micro": accuracy,
        "recall_micro": accuracy,
        "f1_micro": accuracy,
    }


def per_class_metrics(confusion: torch.Tensor) -> dict[str, list[float]]:
    """Per-class precision, recall, F1 and support (for reports)."""
    cm = confusion.double()
    tp, pred_pos, true_pos = cm.diagonal(), cm.sum(0), cm.sum(1)
    precision = torch.where(pred_pos > 0, tp / pred_pos.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true_pos > 0, tp / true_pos.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": true_pos.long().tolist()}


def mean_loss(loss_sum: float | torch.Tensor, count: float | torch.Tensor) -> float:
    count = float(count)
    if count <= 0:
        raise UserError("no items were evaluated (count=0); check the validation split is not empty")
    return float(loss_sum) / count


def perplexity(loss_sum: float | torch.Tensor, count: float | torch.Tensor) -> float:
    """exp(mean token NLL) from the summed NLL and token count; inf instead of an overflow error."""
    loss = mean_loss(loss_sum, count)
    return math.exp(loss) if loss < 700 else math.inf


def all_reduce_stats(stats: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Sum every statistic over the ranks of ``group`` with one collective; returns new tensors.

    ``group`` is the data-parallel group the caller owns; ``None`` means "this process alone" and
    communicates nothing (a deliberate choice: a missing group never silently becomes the world group).
    Values travel as float64 so counts stay exact up to 2**53 (float32 would round past 16.7M tokens).
    """
    if group is None or not dist.is_available() or not dist.is_initialized():
        return {k: v.detach().clone() for k, v in stats.items()}
    keys = sorted(stats)  # same order on every rank
    ref = stats[keys[0]]
    device = ref.device
    flat = torch.cat([stats[k].detach().reshape(-1).to(device=device, dtype=torch.float64) for k in keys])  # (S,)
    hc.all_reduce(flat, group=group)
    out, offset = {}, 0
    for k in keys:
        v = stats[k]
        n = v.numel()
        chunk = flat[offset:offset + n].reshape(v.shape)
        out[k] = chunk.round().to(v.dtype) if not v.is_floating_point() else chunk.to(v.dtype)
        offset += n
    return out
