"""SwiGLU (silu(gate) * up): dispatch + plain-torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatrain.ops.dispatch import backend_for, provider, register

register("swiglu", "triton", "megatrain.triton_kernels.swiglu")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, policy=None) -> torch.Tensor:
    backend = backend_for("swiglu", gate.device, dtype=gate.dtype, shape={"ffn": gate.shape[-1]}, policy=policy)
    if backend != "torch":
        return provider("swiglu", backend)(gate, up)
    return swiglu_reference(gate, up)
