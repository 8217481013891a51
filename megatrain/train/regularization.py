"""Weight decay grouping and explicit L1/L2 penalties."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on matrices only: norms, biases and other vectors are not decayed
    (decaying norm gains pulls them towards zero and hurts, as GPT-2/Llama training recipes note)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}] if decay or not no_decay else []
    if no_decay:  # (only norms/biases train under train.freeze: DeepSpeed takes no empty group)
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def penalty(model: nn.Module, *, l1: float, l2: float) -> torch.Tensor | None:
    """l1·Σ|w| + l2·Σw² over the decayed (matrix) weights, added to the loss; None when both are 0."""
    if l1 == 0 and l2 == 0:
        return None
    total = None
    for p in model.parameters():
        if p.requires_grad and p.dim() >= 2:
            term = 0
            if l1:
                term = term + l1 * p.abs().sum()
            if l2:
                term = term + l2 * p.pow(2).sum()
            total = term if total is None else total + term
    return total
