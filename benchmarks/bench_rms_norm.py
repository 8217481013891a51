"""RMSNorm (and fused residual add + RMSNorm): Triton vs torch eager, torch.compile and Liger."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (tokens, hidden, dtype): KERNELS.md hidden sizes plus Liger's fp32 4096×16384 anchor
GPU_SHAPES = [(16384, 4096, torch.bfloat16), (4096, 16384, torch.float32), (16384, 3000, torch.bfloat16),
              (65536, 192, torch.bfloat16), (8192, 8192, torch.bfloat16)]
SMOKE_SHAPES = [(64, 96, torch.float32)]


def norm_cases(args, *, kernel, reference, kernel_add, reference_add, liger_factory, has_bias: bool,
               op: str = "rms_norm"):
    """fwd, bwd and fused-residual fwd cases per shape (shared with bench_layer_norm.py)."""
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES[:1] if args.quick else GPU_SHAPES
    cases = []
    for n, h, dtype in shapes:  # one function call per shape: the lambdas must not share loop variables
        cases += _shape_cases(args, n, h, dtype, kernel=kernel, reference=reference, kernel_add=kernel_add,
                              reference_add=reference_add, liger_factory=liger_factory, has_bias=has_bias, op=op)
    return cases


def _shape_cases(args, n, h, dtype, *, kernel, reference, kernel_add, reference_add, liger_factory, has_bias, op):
    cases = []
    size = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(n, h, device=args.device, dtype=dtype, requires_grad=True)
    r = torch.randn(n, h, device=args.device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device=args.device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(h, device=args.device, dtype=dtype)).requires_grad_() if has_bias else None
    extra = (b,) if has_bias else ()
    label = f"{n}x{h} {str(dtype).removeprefix('torch.')}"
    comp = common.compiled(reference, args)
    liger = common.optional(lambda: liger_factory(h, w, b))
    fwd = common.variants(
        triton=lambda: kernel(x, w, *extra), torch=lambda: reference(x, w, *extra),
        **{"torch.compile": (lambda: comp(x, w, *extra)) if comp else None,
           "liger": (lambda: liger(x)) if liger else None})
    # fwd: read x, write y; bwd: read x, dy, write dx (weights and per-row stats are noise)
    # what ops/policy.py matches a run against (kernels_<gpu class>.json)
    policy = {"op": op, "dtype": str(dtype).removeprefix("torch."), "shape": {"hidden": h, "tokens": n}}
    cases.append(common.Case(label, "fwd", fwd, bytes_moved=2 * n * h * size, notes={"policy": policy}))
    inputs = [x, w] + ([b] if has_bias else [])
    bwd = {name: common.backward_of(fn, inputs) for name, fn in fwd.items()}
    cases.append(common.Case(label, "bwd", bwd, bytes_moved=3 * n * h * size, notes={"policy": policy}))
    add = common.variants(triton=lambda: kernel_add(x, r, w, *extra), torch=lambda: reference_add(x, r, w, *extra))
    cases.append(common.Case(label + " +res", "fwd", add, bytes_moved=4 * n * h * size))
    return cases



def main(argv=None):
    args = common.setup("bench_rms_norm", __doc__, argv)
    from megatrain.ops.norms import rms_norm_reference
    from megatrain.triton_kernels.rms_norm import add_rms_norm, rms_norm

    eps = 1e-6

    def liger(h, w, b):
        from liger_kernel.transformers import LigerRMSNorm

        mod = LigerRMSNorm(h, eps=eps).to(device=w.device, dtype=w.dtype)
        return mod

    def reference_add(x, r, w):
        h = x + r
        return rms_norm_reference(h, w, eps), h

    cases = norm_cases(args, kernel=lambda x, w: rms_norm(x, w, eps), reference=lambda x, w: rms_norm_reference(x, w, eps),
                       kernel_add=lambda x, r, w: add_rms_norm(x, r, w, eps), reference_add=reference_add,
                       liger_factory=liger, has_bias=False)
    common.run(args, cases)


if __name__ == "__main__":
    main()
