"""Pruning units of a ResNet (megatrain/models/cnn.py): the inner channels of every residual block.

  basic block       channel j of conv1: filter j of conv1, entry j of bn1 (weight, bias, running stats),
                    input channel j of conv2
  bottleneck block  channel j of conv1 (as above, into conv2), and channel j of conv2: filter j of conv2,
                    entry j of bn2, input channel j of conv3

The residual stream (stem, conv2/conv3 outputs, shortcuts, fc) is coupled across a whole stage by the identity
shortcuts and is not pruned, so every block's output width stays ``widths[i]·expansion``. A removed channel
whose BN output is exactly zero (zero BN weight and bias) changes nothing downstream, which the tests check.
"""
from __future__ import annotations

from torch import nn

from megatrain.compress.channels import Group, Slice


def _bn(prefix: str) -> tuple[Slice, ...]:
    return tuple(Slice(f"{prefix}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var"))


def resnet_groups(model: nn.Module) -> list[Group]:
    """One group per inner conv of every block, in model order; ``stage`` is the block's stage index."""
    groups = []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            p = f"stages.{i}.{j}"
            pairs = [("conv1", "bn1", "conv2")]
            if hasattr(block, "conv3"):  # bottleneck: both inner convs have prunable outputs
                pairs.append(("conv2", "bn2", "conv3"))
            for conv, bn, nxt in pairs:
                slices = (Slice(f"{p}.{conv}.weight", 0), *_bn(f"{p}.{bn}"), Slice(f"{p}.{nxt}.weight", 1))
                groups.append(Group(f"{p}.{conv}", getattr(block, conv).out_channels, slices, stage=i))
    return groups
