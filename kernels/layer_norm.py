"""Fused LayerNorm (optionally with the residual add) on Triton. Kernels live in ``_norm.py``."""
from __future__ import annotations

import torch

from megatrain.ops.norms import layer_norm_reference  # noqa: F401  (the one reference; tests compare to it)
from megatrain.triton_kernels._norm import AddNormFunction, NormFunction, norm_backward, norm_forward


def layer_norm_forward(x, weight, bias, eps, *, residual=None):
    """Host launcher: returns (y, h, mean, rstd); see ``_norm.norm_forward``."""
    return norm_forward(x, weight, bias, eps, is_rms=False, residual=residual)


def layer_norm_backward(dy, h, weight, bias, mean, rstd, *, dres=None):
    """Host launcher: returns (dx, dweight, dbias)."""
    return norm_backward(dy, h, weight, bias, mean, rstd, is_rms=False, dres=dres)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (..., H); fp32 statistics; output in x's dtype."""
    return NormFunction.apply(x, weight, bias, eps, False, x.dtype)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual): the pre-norm block's add and norm in one pass.

    The new residual has ``residual``'s dtype (keep it fp32 for an fp32 residual stream)."""
    return AddNormFunction.apply(x, residual, weight, bias, eps, False, x.dtype)
