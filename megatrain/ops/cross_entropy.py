"""Token cross-entropy: dispatch + plain-torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatrain.ops.dispatch import backend_for, provider, register

register("cross_entropy", "triton", "megatrain.triton_kernels.cross_entropy")


def cross_entropy_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean",
) -> torch.Tensor:
    # logits: (N, V) any float dtype, labels: (N,); loss in fp32
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean",
) -> torch.Tensor:
    backend = backend_for("cross_entropy", logits.device)
    if backend != "torch":
        return provider("cross_entropy", backend)(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    return cross_entropy_reference(logits, labels, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, reduction=reduction)
