"""Fused RMSNorm (optionally with the residual add) on Triton. Kernels live in ``_norm.py``."""
from __future__ import annotations

import torch

from megatrain.ops.norms import rms_norm_reference  # noqa: F401  (the one reference; tests compare to it)
from megatrain.triton_kernels._norm import AddNormFunction, NormFunction, norm_backward, norm_forward


def rms_norm_forward(x, weight, eps, *, residual=None):
    """Host launcher: returns (y, h, mean(unused), rstd); see ``_norm.norm_forward``."""
    return norm_forward(x, weight, None, eps, is_rms=True, residual=residual,
                        out_dtype=torch.promote_types(x.dtype, weight.dtype))


def rms_norm_backward(dy, h, weight, rstd, *, dres=None):
    """Host launcher: returns (dx, dweight)."""
    dx, dw, _ = norm_backward(dy, h, weight, None, rstd, rstd, is_rms=True, dres=dres)
    return dx, dw


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., H); fp32 statistics. Output dtype follows the reference
    (``weight * y.to(x.dtype)``): the promotion of x's and weight's dtypes."""
    return NormFunction.apply(x, weight, None, eps, True, torch.promote_types(x.dtype, weight.dtype))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the new residual has ``residual``'s dtype."""
    return AddNormFunction.apply(x, residual, weight, None, eps, True, torch.promote_types(x.dtype, weight.dtype))
