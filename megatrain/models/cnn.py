"""ResNet-style CNN family for image classification (pure architecture, plain torch).

Stages of residual blocks (basic: two 3×3 convs; bottleneck: 1×1 → 3×3 → 1×1 with 4× expansion), batch-norm
after every conv, a stride-2 downsample at the start of every stage after the first, global average pooling
and a linear head. Two stems: ``small`` (one 3×3 conv, stride 1) keeps the resolution of tiny inputs such as
8×8 digits or 32×32 CIFAR; ``imagenet`` (7×7 stride-2 conv + 3×3 max-pool) shrinks 224×224 inputs by 4 before
the first stage, as in He et al. 2016.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from megatrain.config.schema import ModelConfig
from megatrain.errors import UserError

# Inputs at least this large get the ImageNet stem when build_resnet is told the image size.
IMAGENET_STEM_MIN_SIZE = 64


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, *, stride: int, inner: int | None = None):
        super().__init__()
        out_ch, inner = width * self.expansion, inner or width  # inner < width after channel pruning
        self.conv1 = nn.Conv2d(in_ch, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.act = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        h = self.act(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.act(h + self.shortcut(x))


class BottleneckBlock(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, *, stride: int, inner: int | None = None):
        super().__init__()
        out_ch, inner = width * self.expansion, inner or width  # inner < width after channel pruning
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        # stride on the 3×3 conv (ResNet v1.5): downsampling in a 1×1 conv would drop 3/4 of the pixels unseen
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.act = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, 4·width, H/s, W/s)
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.act(h + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, widths: list[int], blocks_per_stage: list[int],
                 block: Literal["basic", "bottleneck"] = "basic", stem: Literal["small", "imagenet"] = "small",
                 dropout: float = 0.0, inner_widths: list[int] | None = None):
        super().__init__()
        if not widths:
            raise UserError("model.widths is empty; give one width per stage, e.g. [16, 32, 64]")
        if len(widths) != len(blocks_per_stage):
            raise UserError(f"model.widths has {len(widths)} stages but model.blocks_per_stage has "
                             f"{len(blocks_per_stage)}; give one block count per width")
        if any(w <= 0 for w in widths) or any(n <= 0 for n in blocks_per_stage):
            raise UserError(f"model.widths={widths} and model.blocks_per_stage={blocks_per_stage} must be positive")
        inner_widths = list(inner_widths) if inner_widths is not None else list(widths)
        if len(inner_widths) != len(widths) or any(w <= 0 for w in inner_widths):
            raise UserError(f"model.inner_widths={inner_widths} needs one positive width per stage of {widths}")
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[block]
        stem_ch = widths[0]
        if stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_ch, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise UserError(f"stem={stem!r} is not one of small, imagenet")
        stages, ch = [], stem_ch
        for i, (width, inner, num_blocks) in enumerate(zip(widths, inner_widths, blocks_per_stage)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(ch, width, stride=stride, inner=inner))
                ch = width * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(ch, num_classes)
        self.num_features = ch

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, F)
        h = self.stages(self.stem(x))  # (B, F, H', W')
        return self.pool(h).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> logits (B, num_classes)
        return self.fc(self.dropout(self.features(x)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_resnet(model: ResNet) -> None:
    """He init for convs; the last BN of each residual branch starts at zero so every block begins as the
    identity (Goyal et al. 2017), which lets deeper stacks train at the same learning rate as shallow ones."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, (BasicBlock, BottleneckBlock)):
            nn.init.zeros_(m.last_bn.weight)


def resnet_stem(state_or_model) -> str:
    """The stem a ResNet was built with (the config does not record it): 'imagenet' has a 7×7 first conv."""
    w = state_or_model["stem.0.weight"] if isinstance(state_or_model, dict) else state_or_model.stem[0].weight
    return "imagenet" if w.shape[-1] == 7 else "small"


def build_resnet(model_cfg: ModelConfig, *, seed: int | None = None, image_size: int | None = None,
                 stem: Literal["auto", "small", "imagenet"] = "auto") -> ResNet:
    """ResNet from the config; ``stem='auto'`` picks the ImageNet stem for images ≥ 64 px when the size is given.
    ``seed=None`` draws the init from the global RNG (seed it first); an int uses a private stream."""
    if model_cfg.arch != "resnet":
        raise UserError(f"model.arch={model_cfg.arch} is not a CNN; use arch: resnet")
    if stem == "auto":
        stem = "imagenet" if (image_size or 0) >= IMAGENET_STEM_MIN_SIZE else "small"
    if seed is not None:  # a private stream: building never shifts the caller's RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_resnet(model_cfg, seed=None, image_size=image_size, stem=stem)
    model = ResNet(in_channels=model_cfg.in_channels, num_classes=model_cfg.num_classes,
                   widths=list(model_cfg.widths), blocks_per_stage=list(model_cfg.blocks_per_stage),
                   block=model_cfg.block, stem=stem, dropout=model_cfg.dropout,
                   inner_widths=model_cfg.stage_inner_widths)
    init_resnet(model)
    return model
