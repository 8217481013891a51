"""Held-out language-model loss: summed token cross-entropy over the labels that count.

A batch is what the datasets give: ``input_ids`` and ``labels`` (-100 = no loss: prompt tokens of SFT data,
padding), and for packed documents ``positions`` / ``segments``, which are passed to the model so each
document is scored as if alone. The loss is the sum over counted tokens divided by their number (per token,
over the whole evaluation, not a mean of batch means).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODEL_INPUTS = ("positions", "segments")


@torch.no_grad()
def batch_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLL in fp64, number of counted tokens) of one collated batch."""
    device = next(model.parameters()).device
    extras = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    logits = model(batch["input_ids"].to(device), **extras)  # (B, T, V)
    labels = batch["labels"].to(device).reshape(-1)  # (B*T,)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100,
                          reduction="sum")
    return nll.double(), (labels != -100).sum()


def evaluate_lm(model, dataset, *, micro_batch_size: int, max_batches: int = 0) -> dict:
    """loss, ppl, tokens (counted labels) and samples over the first ``max_batches`` micro-batches of
    ``dataset`` (0 = all of it), in dataset order."""
    from torch.utils.data import default_collate
    total, count, samples = torch.zeros((), dtype=torch.float64), 0, 0
    n = len(dataset)
    batches = math.ceil(n / micro_batch_size)
    if max_batches:
        batches = min(batches, max_batches)
    for b in range(batches):
        idx = range(b * micro_batch_size, min((b + 1) * micro_batch_size, n))
        nll, c = batch_loss_sum(model, default_collate([dataset[i] for i in idx]))
        total, count, samples = total + nll.cpu(), count + int(c), samples + len(idx)
    loss = float(total / max(count, 1))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "samples": samples}
