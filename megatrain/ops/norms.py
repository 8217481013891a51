"""LayerNorm and RMSNorm: dispatch + plain-torch references (fp32 statistics, output in input dtype)."""
from __future__ import annotations

import torch

from megatrain.ops.dispatch import backend_for, provider, register

register("layer_norm", "triton", "megatrain.triton_kernels.layer_norm")
register("rms_norm", "triton", "megatrain.triton_kernels.rms_norm")


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    # x: (..., H); statistics in fp32 whatever the input dtype (bf16 variance underflows otherwise)
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., H); matches HF Llama: normalise in fp32, cast back, then scale by the weight
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    backend = backend_for("layer_norm", x.device)
    if backend != "torch":
        return provider("layer_norm", backend)(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    backend = backend_for("rms_norm", x.device)
    if backend != "torch":
        return provider("rms_norm", backend)(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
