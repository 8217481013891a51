"""Multi-tensor AdamW step: every tensor of a parameter group in one launch (per dtype combination).

The host builds a pointer table (int64 addresses of each param, grad, exp_avg, exp_avg_sq and fp32
master copy) and a block table (which tensor and offset each program handles); the kernel loads its
row of the table and casts the addresses back to typed pointers. One program updates BLOCK elements
of one tensor, so tensor sizes need no padding and there is one launch instead of one per tensor.

The math follows torch.optim.AdamW's single-tensor path operation by operation (decoupled decay,
lerp for the first moment, bias corrections folded into the step size and the denominator), so
fp32 results match it elementwise up to the last bit or so.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from megatrain.triton_kernels._common import check_device

BLOCK = 2048
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(
    P_TAB, G_TAB, M_TAB, V_TAB, W_TAB, NUMEL, BLOCK_TENSOR, BLOCK_START,
    decay, beta1, beta2, one_minus_beta1, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)  # which tensor of the table
    offs = tl.load(BLOCK_START + pid) + tl.arange(0, BLOCK)  # int64 offsets inside it
    mask = offs < tl.load(NUMEL + t)
    p_ptr = tl.load(P_TAB + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(G_TAB + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(M_TAB + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(V_TAB + t).to(tl.pointer_type(tl.float32))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASTER:
        w_ptr = tl.load(W_TAB + t).to(tl.pointer_type(tl.float32))
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    w = w * decay  # decoupled weight decay: w · (1 − lr·wd), before the Adam update
    m = m + one_minus_beta1 * (g - m)  # lerp(m, g, 1 − β1)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    w = w + neg_step_size * (m / denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_MASTER:
        tl.store(w_ptr + offs, w, mask=mask)
    tl.store(p_ptr + offs, w.to(P_DTYPE), mask=mask)


@functools.lru_cache(maxsize=64)
def _block_table(numels: tuple[int, ...], device: torch.device):
    """(tensor index, start offset) of every BLOCK-sized program; cached: sizes do not change between steps."""
    counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first_block[tensor_idx.long()]) * BLOCK
    numel = torch.tensor(numels, dtype=torch.int64)
    return tensor_idx.to(device), start.to(device), numel.to(device)


def _ptr_table(tensors, device):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def _check(params, grads, exp_avgs, exp_avg_sqs, master_params):
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if master_params is not None:
        lists["master_params"] = master_params
    for name, other in lists.items():
        if len(other) != len(params):
            raise ValueError(f"adamw_step: {len(other)} {name} for {len(params)} params; pass one per param")
    check_device("adamw_step", *params, *grads, *exp_avgs, *exp_avg_sqs, *(master_params or []))
    for i, p in enumerate(params):
        group = [p, grads[i], exp_avgs[i], exp_avg_sqs[i]] + ([master_params[i]] if master_params else [])
        for t in group:
            if t.shape != p.shape:
                raise ValueError(f"adamw_step: tensor {i} has shapes {[tuple(x.shape) for x in group]}; they must match")
            if not t.is_contiguous():
                raise ValueError(f"adamw_step: tensor {i} is not contiguous; the flat pointer table needs contiguous tensors")
            if t.dtype not in _TL_DTYPES:
                raise ValueError(f"adamw_step: tensor {i} has dtype {t.dtype}; use fp32, bf16 or fp16")
        states = [exp_avgs[i], exp_avg_sqs[i]] + ([master_params[i]] if master_params else [])
        if any(s.dtype != torch.float32 for s in states):
            raise ValueError(f"adamw_step: tensor {i}: exp_avg, exp_avg_sq and master weights must be fp32")
        if master_params is None and p.dtype != torch.float32:
            raise ValueError(f"adamw_step: param {i} is {p.dtype}; pass fp32 master_params for low-precision params")


def adamw_step(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.01, master_params: list[torch.Tensor] | None = None,
) -> None:
    """One AdamW step over many tensors, in place, in one launch per (param dtype, grad dtype) pair.

    params: the model's weights (fp32; or bf16/fp16 when ``master_params`` is given). grads: same shapes,
    any of fp32/bf16/fp16. exp_avgs, exp_avg_sqs: fp32 state, updated in place. master_params: optional
    fp32 copies; then the update happens on them and params receive the result rounded to their dtype.
    step: the step number after incrementing (1 on the first step), shared by all tensors here; call
    once per param group for per-group hyperparameters. All tensors contiguous, on one CUDA device
    (or CPU under TRITON_INTERPRET=1). Equals torch.optim.AdamW(foreach=False) elementwise."""
    if step < 1:
        raise ValueError(f"adamw_step: step={step}; it counts from 1 (increment before calling)")
    _check(params, grads, exp_avgs, exp_avg_sqs, master_params)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    scalars = (1.0 - lr * weight_decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2, -lr / bias_correction1,
               bias_correction2_sqrt, eps)
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            buckets.setdefault((p.dtype, grads[i].dtype), []).append(i)
    for (p_dtype, g_dtype), idx in buckets.items():
        device = params[idx[0]].device
        tensor_idx, start, numel = _block_table(tuple(params[i].numel() for i in idx), device)
        tables = [_ptr_table([lst[i] for i in idx], device) for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        w_tab = _ptr_table([master_params[i] for i in idx], device) if master_params is not None else None
        _adamw_kernel[(tensor_idx.numel(),)](
            *tables, w_tab, numel, tensor_idx, start, *scalars,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], HAS_MASTER=master_params is not None,
            BLOCK=BLOCK, num_warps=4,
        )


@torch.no_grad()
def adamw_step_reference(
    params, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.01, master_params=None,
) -> None:
    """The same step in plain torch, tensor by tensor, with torch.optim.AdamW's single-tensor operations."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for i, p in enumerate(params):
        w = master_params[i] if master_params is not None else p
        g = grads[i].float()
        w.mul_(1.0 - lr * weight_decay)
        exp_avgs[i].lerp_(g, 1.0 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(exp_avgs[i], denom, value=-lr / bias_correction1)
        if master_params is not None:
            p.copy_(w)
