"""Cross-entropy forward+backward and fused linear+CE: Triton vs torch eager, torch.compile and Liger.

Also records the peak extra memory of one forward+backward (the issue asks for no more than Liger's).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (tokens, vocab, dtype) for CE; (tokens, hidden, vocab, dtype) for fused linear+CE
CE_SHAPES = [(8192, 131072, torch.bfloat16), (8192, 128256, torch.bfloat16), (8192, 50257, torch.bfloat16)]
FLCE_SHAPES = [(8192, 4096, 128256, torch.bfloat16), (8192, 2048, 50257, torch.bfloat16)]
SMOKE_CE = [(8, 100, torch.float32)]
SMOKE_FLCE = [(8, 16, 100, torch.float32)]


def _fwd_bwd(loss_fn, leaves):
    def run():
        for x in leaves:
            x.grad = None
        loss_fn().backward()

    return run


def _ce_cases(args, n, v, dtype, cross_entropy, reference):
    size = torch.tensor([], dtype=dtype).element_size()
    logits = torch.randn(n, v, device=args.device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), device=args.device)
    comp = common.compiled(reference, args)

    def liger_factory():
        from liger_kernel.transformers import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()

    liger = common.optional(liger_factory)
    losses = common.variants(
        triton=lambda: cross_entropy(logits, labels), torch=lambda: reference(logits, labels),
        **{"torch.compile": (lambda: comp(logits, labels)) if comp else None,
           "liger": (lambda: liger(logits, labels)) if liger else None})
    runs = {name: _fwd_bwd(fn, [logits]) for name, fn in losses.items()}
    peaks = {name: common.peak_memory_mb(fn, args.device) for name, fn in runs.items()}
    label = f"{n}x{v} {str(dtype).removeprefix('torch.')}"
    # compulsory: read logits once, write their gradient once
    policy = {"op": "cross_entropy", "dtype": str(dtype).removeprefix("torch."), "shape": {"vocab": v, "tokens": n}}
    return [common.Case(label, "fwd+bwd", runs, bytes_moved=2 * n * v * size,
                        notes={"peak_mb": peaks, "policy": policy})]


def _flce_cases(args, n, h, v, dtype, fused, reference):
    hidden = torch.randn(n, h, device=args.device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=args.device, dtype=dtype) / h ** 0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=args.device)
    comp = common.compiled(reference, args)

    def liger_factory():
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        return lambda: LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels)

    liger = common.optional(liger_factory)
    losses = common.variants(
        triton=lambda: fused(hidden, weight, labels), torch=lambda: reference(hidden, weight, labels),
        **{"torch.compile": (lambda: comp(hidden, weight, labels)) if comp else None, "liger": liger})
    runs = {name: _fwd_bwd(fn, [hidden, weight]) for name, fn in losses.items()}
    peaks = {name: common.peak_memory_mb(fn, args.device) for name, fn in runs.items()}
    label = f"{n}x{h}->{v} {str(dtype).removeprefix('torch.')}"
    # three (N×H)·(H×V) products: logits, d hidden, d weight
    return [common.Case(label, "fwd+bwd", runs, flops=3 * 2 * n * h * v, notes={"peak_mb": peaks})]


def main(argv=None):
    args = common.setup("bench_cross_entropy", __doc__, argv)
    from megatrain.ops.cross_entropy import cross_entropy_reference, fused_linear_cross_entropy_reference
    from megatrain.triton_kernels.cross_entropy import cross_entropy
    from megatrain.triton_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    ce = SMOKE_CE if args.smoke else CE_SHAPES[:1] if args.quick else CE_SHAPES
    flce = SMOKE_FLCE if args.smoke else FLCE_SHAPES[:1] if args.quick else FLCE_SHAPES
    cases = [c for s in ce for c in _ce_cases(args, *s, cross_entropy, cross_entropy_reference)]
    cases += [c for s in flce for c in _flce_cases(args, *s, fused_linear_cross_entropy,
                                                   fused_linear_cross_entropy_reference)]
    rows = common.run(args, cases)
    if args.device == "cuda":
        print("peak extra memory per fwd+bwd (MiB):")
        for case in cases:
            print(f"  {case.label}: " + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} -"
                                                  for k, v in case.notes["peak_mb"].items()))
    return rows


if __name__ == "__main__":
    main()
