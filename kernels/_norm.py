"""LayerNorm / RMSNorm kernels with an optional fused residual add (shared by layer_norm.py and rms_norm.py).

Forward: one program per row; the whole row sits in registers (hidden ≤ 65536), statistics in fp32.
Backward: a grid-stride pass writes dx per row and accumulates each program's partial dW/dB in
registers; a second small pass (a column sum over the (num_programs, H) partials) reduces them. This
avoids atomics, so gradients are deterministic run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatrain.triton_kernels._common import (
    as_rows, check_device, next_pow2, num_persistent_programs, warps_for_block,
)

MAX_HIDDEN = 65536  # one row per program in registers; wider rows would spill


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, H_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_h,
    n_cols, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 on large batches
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    if HAS_RES:
        r = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # Round h to the residual dtype before normalising: the unfused path does exactly that.
        h = (x + r).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, DRES, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_dy, stride_dres, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride can pass 2**31
    for i in range(0, rows_per_program):
        row = row_start + i
        # The last program may run past n_rows: mask instead of branching (dy = 0 adds nothing to dW).
        # (Not `mask & (row < n_rows)`: the interpreter mistypes a tensor-&-scalar mask as int32.)
        rmask = cols < tl.where(row < n_rows, n_cols, 0)
        x = tl.load(X + row * stride_x + cols, mask=rmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=rmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < n_rows, other=0.0)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(rmask, (x - tl.load(MEAN + row, mask=row < n_rows, other=0.0)) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / n_cols
            dx = (wdy - xhat * c1 - c2) * rstd
        if HAS_DRES:
            # The new residual h = x + residual also feeds later layers: its gradient adds here.
            dx += tl.load(DRES + row * stride_dres + cols, mask=rmask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=rmask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * n_cols + cols, db, mask=mask)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           residual: torch.Tensor | None) -> int:
    check_device(op, x, weight, bias, residual)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}, expected ({hidden},) to match x's last dim")
    if bias is not None and bias.shape != (hidden,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({hidden},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {hidden} > {MAX_HIDDEN} is not supported; use the torch backend")
    return hidden


def norm_forward(x, weight, bias, eps, *, is_rms: bool, residual=None, out_dtype=None):
    """Launch the forward. Returns (y, h, mean, rstd): h = x + residual (or x), y = norm(h) (..., H)."""
    op = "rms_norm" if is_rms else "layer_norm"
    hidden = _check(op, x, weight, bias, residual)
    x2 = as_rows(x)  # (N, H)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, hidden), device=x.device, dtype=out_dtype or x.dtype)
    res2 = h = None
    if residual is not None:
        res2 = as_rows(residual)
        h = torch.empty((n_rows, hidden), device=x.device, dtype=residual.dtype)
    mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block = next_pow2(hidden)
    if n_rows > 0:
        _norm_fwd_kernel[(n_rows,)](
            x2, res2, weight, bias, y, h, mean, rstd,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0), h.stride(0) if h is not None else 0,
            hidden, eps,
            IS_RMS=is_rms, HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=warps_for_block(block),
        )
    h = x2 if h is None else h
    return y.view(*x.shape[:-1], hidden), h, mean, rstd


def norm_backward(dy, h, weight, bias, mean, rstd, *, is_rms: bool, dres=None, dx_dtype=None):
    """Launch the backward. ``h``: (N, H) normalised input. Returns (dx (N, H), dweight, dbias or None)."""
    n_rows, hidden = h.shape
    dy2 = as_rows(dy)
    dres2 = as_rows(dres) if dres is not None else None
    dx = torch.empty((n_rows, hidden), device=h.device, dtype=dx_dtype or h.dtype)
    num_programs = num_persistent_programs(n_rows, h.device)
    rows_per_program = triton.cdiv(n_rows, num_programs)
    dw_part = torch.empty((num_programs, hidden), device=h.device, dtype=torch.float32)
    db_part = torch.empty((num_programs, hidden), device=h.device, dtype=torch.float32) if bias is not None else None
    block = next_pow2(hidden)
    if n_rows > 0:
        _norm_bwd_kernel[(num_programs,)](
            dy2, dres2, h, weight, mean, rstd, dx, dw_part, db_part,
            dy2.stride(0), dres2.stride(0) if dres2 is not None else 0, h.stride(0), dx.stride(0),
            n_rows, hidden, rows_per_program,
            IS_RMS=is_rms, HAS_DRES=dres is not None, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=warps_for_block(block),
        )
    else:
        dw_part.zero_()
        if db_part is not None:
            db_part.zero_()
    # Second pass: (num_programs, H) -> (H,); tiny next to the row pass.
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class NormFunction(torch.autograd.Function):
    """y = norm(x) * weight (+ bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms, out_dtype):
        y, h, mean, rstd = norm_forward(x, weight, bias, eps, is_rms=is_rms, out_dtype=out_dtype)
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.is_rms, ctx.x_shape, ctx.x_dtype = is_rms, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_backward(dy, h, weight, bias, mean, rstd, is_rms=ctx.is_rms, dx_dtype=ctx.x_dtype)
        return dx.view(ctx.x_shape), dw, db, None, None, None


class AddNormFunction(torch.autograd.Function):
    """h = x + residual; y = norm(h) * weight (+ bias). Returns (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, out_dtype):
        y, h, mean, rstd = norm_forward(x, weight, bias, eps, is_rms=is_rms, residual=residual, out_dtype=out_dtype)
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.is_rms, ctx.x_dtype, ctx.res_dtype = is_rms, x.dtype, residual.dtype
        return y, h.view(residual.shape)

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_backward(dy, h, weight, bias, mean, rstd, is_rms=ctx.is_rms, dres=dh)
        shape = dy.shape
        # d(x + residual)/dx = d/dresidual = identity: both inputs get the same gradient.
        return (dx.view(shape).to(ctx.x_dtype), dx.view(shape).to(ctx.res_dtype), dw, db, None, None, None)
