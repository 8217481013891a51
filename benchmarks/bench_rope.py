"""RoPE on q and k, forward and backward: Triton (out of place and in place) vs torch eager, torch.compile, Liger."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (B, Hq, Hkv, T, D, dtype): Llama-3-8B-like heads (GQA 4:1), and hdim 64
GPU_SHAPES = [(4, 32, 8, 4096, 128, torch.bfloat16), (8, 16, 16, 2048, 64, torch.bfloat16)]
SMOKE_SHAPES = [(1, 4, 2, 9, 16, torch.float32)]


def _cases(args, b, hq, hkv, t, d, dtype, rope, reference, rope_cache):
    size = torch.tensor([], dtype=dtype).element_size()
    q = torch.randn(b, hq, t, d, device=args.device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, t, d, device=args.device, dtype=dtype, requires_grad=True)
    cos, sin = rope_cache(t, d, device=args.device, dtype=dtype)
    q_buf, k_buf = q.detach().clone(), k.detach().clone()  # the in-place variant rotates these over and over
    comp = common.compiled(reference, args)

    def liger_factory():
        from liger_kernel.transformers import liger_rotary_pos_emb

        return liger_rotary_pos_emb

    liger = common.optional(liger_factory)
    fwd = common.variants(
        triton=lambda: rope(q, k, cos, sin), torch=lambda: reference(q, k, cos, sin),
        **{"triton-inplace": lambda: rope(q_buf, k_buf, cos, sin, inplace=True),
           "torch.compile": (lambda: comp(q, k, cos, sin)) if comp else None,
           "liger": (lambda: liger(q, k, cos[None], sin[None])) if liger else None})
    label = f"B{b} Hq{hq} Hkv{hkv} T{t} D{d} {str(dtype).removeprefix('torch.')}"
    bwd = {name: common.backward_of(fn, [q, k]) for name, fn in fwd.items() if name != "triton-inplace"}
    moved = 2 * (q.numel() + k.numel()) * size  # read + write q and k; cos/sin stay in cache
    policy = {"op": "rope", "dtype": str(dtype).removeprefix("torch."), "shape": {"head_dim": d, "seq_len": t}}
    return [common.Case(label, "fwd", fwd, bytes_moved=moved, notes={"policy": policy}),
            common.Case(label, "bwd", bwd, bytes_moved=moved, notes={"policy": policy})]


def main(argv=None):
    args = common.setup("bench_rope", __doc__, argv)
    from megatrain.ops.rope import apply_rope_reference, rope_cache
    from megatrain.triton_kernels.rope import rope

    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES[:1] if args.quick else GPU_SHAPES
    cases = [c for shape in shapes for c in _cases(args, *shape, rope, apply_rope_reference, rope_cache)]
    common.run(args, cases)


if __name__ == "__main__":
    main()
