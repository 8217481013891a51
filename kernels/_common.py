"""Small host-side helpers shared by the Triton kernels (no kernels here)."""
from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (tests only, fp32 only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Kernels need CUDA tensors (or CPU ones under the interpreter), all on one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on several devices {sorted(map(str, devices))}; move them to one")
    for device in devices:
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"{op}: Triton kernels need CUDA tensors, got {device}; use model.kernels=torch on CPU")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_persistent_programs(n_items: int, device: torch.device, *, per_sm: int = 2) -> int:
    """Programs for a grid-stride kernel: a few per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return max(1, min(n_items, per_sm * _sm_count(device.index or 0)))
    return max(1, min(n_items, 4))


def warps_for_block(block: int) -> int:
    """Warps for a one-row-per-program kernel: enough threads to keep ~8–16 elements per thread."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) with unit stride on the last dim (copies only when it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2
