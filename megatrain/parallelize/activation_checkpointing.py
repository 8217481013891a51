"""Activation checkpointing as a transform: recompute a block's activations in backward.

The block's forward is replaced on the instance rather than wrapping the module, so parameter names
(and therefore checkpoints and Hugging Face maps) are the same with and without checkpointing.
"""
from __future__ import annotations

import torch.utils.checkpoint as ckpt
from torch import nn


def _checkpointed(block: nn.Module):
    inner = block.forward

    def forward(*args):
        if not block.training:
            return inner(*args)
        # non-reentrant: works with ZeRO-3's parameter hooks and with inputs that need no grad
        return ckpt.checkpoint(inner, *args, use_reentrant=False)

    return forward


def apply_activation_checkpointing(blocks, *, mode: str, every_n: int) -> int:
    """Checkpoint every block (``every``) or every N-th (``every_n``) in place; returns how many."""
    if mode == "none":
        return 0
    n = 0
    for i, block in enumerate(blocks):
        if mode == "every" or (mode == "every_n" and i % every_n == 0):
            block.forward = _checkpointed(block)
            n += 1
    return n
