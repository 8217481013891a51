"""SwiGLU (silu(gate)·up) forward and backward: Triton vs torch eager, torch.compile and Liger."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (tokens, ffn, dtype): Llama-7B/8B FFN widths and Liger's 32768 anchor
GPU_SHAPES = [(8192, 11008, torch.bfloat16), (8192, 14336, torch.bfloat16), (4096, 32768, torch.bfloat16)]
SMOKE_SHAPES = [(16, 200, torch.float32)]


def _cases(args, n, f, dtype, swiglu, reference):
    size = torch.tensor([], dtype=dtype).element_size()
    gate = torch.randn(n, f, device=args.device, dtype=dtype, requires_grad=True)
    up = torch.randn(n, f, device=args.device, dtype=dtype, requires_grad=True)
    comp = common.compiled(reference, args)

    def liger_factory():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply

    liger = common.optional(liger_factory)
    fwd = common.variants(triton=lambda: swiglu(gate, up), torch=lambda: reference(gate, up),
                          **{"torch.compile": (lambda: comp(gate, up)) if comp else None,
                             "liger": (lambda: liger(gate, up)) if liger else None})
    label = f"{n}x{f} {str(dtype).removeprefix('torch.')}"
    bwd = {name: common.backward_of(fn, [gate, up]) for name, fn in fwd.items()}
    # fwd: read gate, up, write out; bwd: read dy, gate, up, write dgate, dup
    policy = {"op": "swiglu", "dtype": str(dtype).removeprefix("torch."), "shape": {"ffn": f, "tokens": n}}
    return [common.Case(label, "fwd", fwd, bytes_moved=3 * n * f * size, notes={"policy": policy}),
            common.Case(label, "bwd", bwd, bytes_moved=5 * n * f * size, notes={"policy": policy})]


def main(argv=None):
    args = common.setup("bench_swiglu", __doc__, argv)
    from megatrain.ops.activations import swiglu_reference
    from megatrain.triton_kernels.swiglu import swiglu

    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES[:1] if args.quick else GPU_SHAPES
    cases = [c for n, f, dtype in shapes for c in _cases(args, n, f, dtype, swiglu, swiglu_reference)]
    common.run(args, cases)


if __name__ == "__main__":
    main()
