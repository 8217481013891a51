"""Per-step efficiency fields of the metrics line: ``mfu`` and ``peak_mem_gib``.

mfu = model FLOPs per token (training, PaLM convention: models/transformer.py ``flops_per_token``) × tokens/s
÷ (ranks × the device's dense bf16 peak). The peak comes from the datasheet table below, keyed by the CUDA
device name; on CPU (no such figure) and for models without a FLOP count, ``mfu`` is left out of the record.
peak_mem_gib = torch.cuda.max_memory_allocated (the run's high-water mark so far) on GPU, the process's peak
RSS (getrusage ru_maxrss) on CPU.
"""
from __future__ import annotations

import resource
import sys

import torch

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets; first match wins, so the
# more specific names come first. "H100 80GB HBM3" is the SXM part.
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0),
    ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 (no bf16 on Volta)
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a CUDA device by name; None when it is not in the table."""
    name = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def flops_per_item(cfg) -> float | None:
    """Training FLOPs per token for Transformer language models; None for other models (no mfu)."""
    if not (cfg.model.is_transformer and cfg.model.task == "language_modeling"):
        return None
    from megatrain.models.transformer import flops_per_token
    return flops_per_token(cfg.model, cfg.seq_len)


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class StepPerf:
    """Built once per run; ``fields(items_per_s)`` gives the step's mfu (when known) and peak_mem_gib."""

    def __init__(self, cfg, device: torch.device, world_size: int):
        self.device = device
        self.world = world_size
        self.flops = flops_per_item(cfg)
        self.peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def fields(self, items_per_s: float) -> dict[str, float]:
        out = {}
        if self.flops is not None and self.peak is not None:
            out["mfu"] = self.flops * items_per_s / (self.world * self.peak)
        out["peak_mem_gib"] = peak_mem_gib(self.device)
        return out
