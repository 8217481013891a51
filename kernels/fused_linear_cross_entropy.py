"""Linear head + cross-entropy without the full (N, V) logits: chunk over tokens.

Per chunk of C tokens: logits_c = h_c @ Wᵀ (+ b) with cuBLAS, the CE kernel overwrites logits_c with
its gradient, and the chunk's contributions to dh, dW, db are taken at once; the chunk buffer is then
reused. Peak extra memory is C×V instead of N×V (the default C makes C×V ≈ N×H). The backward only
scales the stored gradients by the upstream scalar, so reduction='none' is not offered.
"""
from __future__ import annotations

import torch
import triton

from megatrain.triton_kernels._common import check_device, next_pow2
from megatrain.triton_kernels.cross_entropy import check_ce_args, defers_scale, grad_scale, launch_ce_rows


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so a chunk's logits are about as large as the hidden states (N×H)."""
    n_chunks = triton.cdiv(vocab, hidden)
    return max(1, min(n_tokens, next_pow2(triton.cdiv(n_tokens, n_chunks))))


def fused_linear_cross_entropy_forward(hidden, weight, labels, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                                       reduction="mean", chunk_size=None, need_grads=(True, True, True),
                                       defer_scale=False):
    """Host launcher. hidden (N, H), weight (V, H), bias (V,) or None, labels (N,).

    Returns (loss, d hidden, d weight, d bias, scale), gradients for an upstream gradient of 1 (None where
    ``need_grads`` = (hidden, weight, bias) says so). dW and db accumulate in fp32. With ``defer_scale``
    (fp16) the gradients are unscaled, dW and db stay fp32, and the caller multiplies by ``scale``
    (1-element fp32; 1/N for 'mean') in the backward, so 1/N never flushes fp16 values to zero.
    Unscaled chunk products are bounded by C·max|h| (|dlogits| ≤ 1), far below fp16's 65504 at the
    default chunk sizes."""
    check_device("fused_linear_cross_entropy", hidden, weight, bias, labels)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} must be (N, H) and weight "
                         f"{tuple(weight.shape)} (V, H); flatten batch and time first")
    if reduction == "none":
        raise ValueError("fused_linear_cross_entropy: reduction='none' is not supported; use mean or sum")
    n_tokens, _ = hidden.shape
    vocab = weight.shape[0]
    check_ce_args("fused_linear_cross_entropy", hidden.new_empty((n_tokens, 0)), labels,
                  label_smoothing=label_smoothing, reduction=reduction)
    chunk = chunk_size or default_chunk_size(n_tokens, hidden.shape[1], vocab)
    labels = labels.contiguous()
    n_valid, scale = grad_scale(labels, ignore_index, reduction)
    write_scale = torch.ones_like(scale) if defer_scale else scale
    need_h, need_w, need_b = need_grads
    need_b = need_b and bias is not None
    loss_rows = torch.empty(n_tokens, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n_tokens, device=hidden.device, dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if need_h else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    d_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if need_b else None
    any_grad = need_h or need_w or need_b
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h_c = hidden[start:end]  # (C, H)
        logits_c = h_c @ weight.t()  # (C, V), the only vocab-sized buffer
        if bias is not None:
            logits_c += bias
        launch_ce_rows(logits_c, labels[start:end], logits_c if any_grad else None, loss_rows[start:end],
                       lse[start:end], write_scale, ignore_index=ignore_index, label_smoothing=label_smoothing)
        # logits_c now holds d loss / d logits_c
        if need_h:
            torch.mm(logits_c, weight, out=d_hidden[start:end])  # (C, H)
        if need_w:
            if logits_c.dtype == torch.float32:
                d_weight.addmm_(logits_c.t(), h_c)  # (V, H), no temporary
            else:
                # One (V, H) low-precision product per chunk, summed in fp32 so that the V/H chunks do
                # not each round the running total to bf16.
                d_weight.add_(logits_c.t() @ h_c)
        if need_b:
            d_bias.add_(logits_c.sum(0))
    loss = loss_rows.sum() if reduction == "sum" else loss_rows.sum() / n_valid[0]
    if defer_scale:  # fp32 dW/db until the backward has scaled them
        return loss, d_hidden, d_weight, d_bias, scale
    return (loss, d_hidden, d_weight.to(weight.dtype) if need_w else None,
            d_bias.to(bias.dtype) if need_b else None, None)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size):
        need = ctx.needs_input_grad
        loss, d_h, d_w, d_b, deferred = fused_linear_cross_entropy_forward(
            hidden, weight, labels, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction, chunk_size=chunk_size, need_grads=(need[0], need[1], need[3]),
            defer_scale=defers_scale(hidden.dtype))
        ctx.grads = (d_h, d_w, d_b)
        ctx.deferred = deferred
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward called twice (retain_graph is not supported)")
        if ctx.deferred is not None:  # fp16: one fp32 factor (upstream × 1/N), rounded once into each dtype
            factor = grad_output.float().reshape(1) * ctx.deferred  # (1,)
            d_h, d_w, d_b = (None if g is None else g.mul_(factor).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes))
        else:
            d_h, d_w, d_b = (None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return d_h, d_w, None, d_b, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, reduction: str = "mean",
                               chunk_size: int | None = None) -> torch.Tensor:
    """CE(hidden @ weightᵀ + bias, labels) without materialising the (N, V) logits.

    hidden (N, H), weight (V, H) (an untied or tied LM head), labels (N,); reduction mean or sum;
    loss in fp32. Gradients are computed in the forward; one backward per forward."""
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, bias, ignore_index, label_smoothing,
                                                 reduction, chunk_size)
