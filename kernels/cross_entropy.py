"""Cross-entropy with the gradient written during the forward (the softmax is never stored).

One program per token row streams the vocabulary twice in blocks: pass 1 keeps an online max and
sum-exp (plus the target logit and the logit sum for label smoothing), pass 2 writes
d loss/d logits = (softmax − (1−ε)·onehot − ε/V) · scale. The backward then only scales that buffer
by the upstream gradient. The same row helpers serve the fused linear+CE (fused_linear_cross_entropy.py)
and the vocab-parallel variant (vocab_parallel_cross_entropy.py), which splits the two passes around
its all-reduces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatrain.ops.cross_entropy import cross_entropy_reference  # noqa: F401  (the one reference)
from megatrain.triton_kernels._common import check_device, interpreting, next_pow2

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _row_stats(ROW, n_cols, label_local, BLOCK: tl.constexpr):
    """(max, sum exp(x − max), x[label_local] or 0, sum x) over one row, in fp32."""
    m = float("-inf")
    s = 0.0
    x_sum = 0.0
    x_target = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(ROW + offs, mask=mask, other=float("-inf")).to(tl.float32)  # (BLOCK,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        # `& mask`: a label past this row (vocab shard) must not hit a masked -inf lane
        x_target += tl.sum(tl.where((offs == label_local) & mask, x, 0.0), axis=0)
    return m, s, x_target, x_sum


@triton.jit
def _row_write_grad(ROW, GROW, n_cols, label_local, lse, scale, smoothing, vocab_total, BLOCK: tl.constexpr):
    """GROW[j] = (exp(x_j − lse) − (1−ε)·[j == label] − ε/V) · scale. GROW may alias ROW."""
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(ROW + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - smoothing / vocab_total
        g = tl.where(offs == label_local, g - (1.0 - smoothing), g)
        tl.store(GROW + offs, (g * scale).to(GROW.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    LOGITS, LABELS, GRAD, LOSS, LSE, SCALE,
    stride_l, stride_g, n_cols, ignore_index, smoothing,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: 16k tokens × 128k vocab passes 2**31 elements
    ROW = LOGITS + row * stride_l
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    m, s, x_target, x_sum = _row_stats(ROW, n_cols, label, BLOCK)
    lse = m + tl.log(s)
    # (1−ε)(lse − x_t) + ε(lse − mean x): torch's label-smoothed CE, written without a second lse
    loss = lse - (1.0 - smoothing) * x_target - smoothing * x_sum / n_cols
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)
    if COMPUTE_GRAD:
        GROW = GRAD + row * stride_g
        scale = tl.where(valid, tl.load(SCALE), 0.0)  # ignored rows get an all-zero gradient
        _row_write_grad(ROW, GROW, n_cols, label, lse, scale, smoothing, n_cols, BLOCK)


def vocab_block(n_cols: int, *, block: int | None = None) -> int:
    if block is not None:
        return block
    # Interpreter: small blocks keep numpy temporaries small; GPU: 8k fp32 per pass (untuned).
    return min(next_pow2(n_cols), 64 if interpreting() else 8192)


def check_ce_args(op: str, logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float,
                  reduction: str) -> None:
    check_device(op, logits, labels)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (N, V), got {tuple(logits.shape)}; flatten batch and time first")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must be ({logits.shape[0]},) to match logits")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing={label_smoothing} must be in [0, 1]")


def grad_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of non-ignored rows, per-row gradient scale) as 1-element fp32 device tensors (no host sync)."""
    n_valid = (labels != ignore_index).sum().to(torch.float32).reshape(1)
    if reduction == "mean":
        return n_valid, 1.0 / n_valid.clamp_min(1.0)
    return n_valid, torch.ones(1, device=labels.device, dtype=torch.float32)


def launch_ce_rows(logits, labels, grad, loss_rows, lse, scale, *, ignore_index, label_smoothing, block=None):
    """Raw launch: per-row loss and lse into fp32 (N,) buffers; grad (N, V) (or None) scaled by
    ``scale`` (a 1-element fp32 device tensor) — the caller owns every buffer. logits: unit last stride."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    _ce_fwd_kernel[(n_rows,)](
        logits, labels, grad, loss_rows, lse, scale,
        logits.stride(0), grad.stride(0) if grad is not None else 0, n_cols, ignore_index, float(label_smoothing),
        COMPUTE_GRAD=grad is not None, BLOCK=vocab_block(n_cols, block=block),
        num_warps=16 if n_cols >= 8192 else 4,
    )


def defers_scale(dtype: torch.dtype) -> bool:
    """fp16 gradients are written unscaled and get 1/N in the backward, together with the upstream gradient
    (which carries the fp16 loss scale): softmax values times 1/N fall below fp16's smallest subnormal (6e-8)
    once N passes a few thousand tokens, and would be flushed to zero. bf16 and fp32 have the range."""
    return dtype == torch.float16


def cross_entropy_forward(logits, labels, *, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                          compute_grad=True, grad_out=None, block=None, defer_scale=False):
    """Host launcher. logits (N, V), labels (N,). Returns (loss, grad (N, V) or None, lse (N,)).

    The gradient is for ``reduction`` with an upstream gradient of 1 — or, with ``defer_scale``, for an
    upstream gradient of 1 and per-row scale 1 (the caller applies the 1/N of 'mean' later; see
    ``defers_scale``). ``grad_out`` may be ``logits`` itself to overwrite it (saves N×V memory when the
    caller no longer needs the logits)."""
    check_ce_args("cross_entropy", logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    n_rows, n_cols = logits.shape
    n_valid, scale = grad_scale(labels, ignore_index, reduction)
    loss_rows = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    grad = None
    if compute_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(logits)
    write_scale = torch.ones_like(scale) if defer_scale else scale
    launch_ce_rows(logits, labels, grad, loss_rows, lse, write_scale, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, block=block)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:  # torch gives NaN when every row is ignored (0/0); so does this
        loss = loss_rows.sum() / n_valid[0]
    return loss, grad, lse


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """grad *= upstream gradient (scalar, or per row for reduction='none') [× a deferred 1-element fp32
    ``scale``], in place. With a deferred scale the factor stays fp32 (a (1,) tensor, so the product is
    computed in fp32 and rounded once into grad's dtype)."""
    if scale is not None:
        factor = grad_output.float().reshape(-1) * scale  # (1,) or (N,)
        return grad.mul_(factor.unsqueeze(-1) if grad_output.dim() else factor)
    if grad_output.dim() == 0:
        return grad.mul_(grad_output.to(grad.dtype))
    return grad.mul_(grad_output.to(grad.dtype).unsqueeze(-1))


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction, reuse_logits):
        compute_grad = ctx.needs_input_grad[0]
        reuse = reuse_logits and compute_grad and logits.stride(-1) == 1
        defer = compute_grad and defers_scale(logits.dtype)
        loss, grad, _ = cross_entropy_forward(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
            compute_grad=compute_grad, grad_out=logits if reuse else None, defer_scale=defer)
        if reuse:
            # the kernel wrote over the logits behind autograd's back: bump their version so that an op which
            # saved them for its backward (a softcap, a tanh) raises instead of using the overwritten values
            torch.autograd.graph.increment_version(logits)
        ctx.grad = grad  # not save_for_backward: it is a buffer we own and scale in place once
        ctx.deferred = grad_scale(labels, ignore_index, reduction)[1] if defer else None
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("cross_entropy: backward called twice (retain_graph) or without a gradient buffer")
        ctx.grad = None
        return scale_grad_(grad, grad_output, ctx.deferred), None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", reuse_logits: bool = False) -> torch.Tensor:
    """Token cross-entropy over logits (N, V) and labels (N,); loss in fp32.

    ``reuse_logits=True`` writes the gradient over ``logits`` (Liger-style, saves N×V memory); only
    for callers that do not read the logits afterwards (an op that saved them for backward raises).
    fp16 gradients get the 1/N of 'mean' in the backward (``defers_scale``). Labels outside [0, V) other than
    ``ignore_index`` are not checked (that would need a host sync). One backward per forward."""
    return CrossEntropyFunction.apply(logits, labels, ignore_index, label_smoothing, reduction, reuse_logits)
