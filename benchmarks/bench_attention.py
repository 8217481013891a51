"""Flash attention forward and backward: Triton vs torch SDPA (default, cuDNN and flash backends).

FLOPs = 4·B·S²·H·D forward (halved when causal), 2.5× that backward; 16k tokens per batch at every S.
Packed rows (``packed`` in the label): causal attention inside documents of DOC_LEN tokens (segment ids), against
SDPA with the boolean document mask the torch reference builds; FLOPs counted as attended: 4·B·H·D·Σ doc²/2.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEQ = [512, 1024, 2048, 4096, 8192, 16384]
TOKENS = 16384
SMOKE = [(1, 2, 1, 40, 32, torch.float32, True)]
DOC_LEN = 512  # packed rows: documents of this many tokens (the last one shorter)
SMOKE_PACKED = [(1, 2, 1, 40, 32, torch.float32, 16)]


def gpu_shapes(quick: bool):
    """(B, Hq, Hkv, S, D, dtype, causal): hdim 128 (16 heads) and 64 (32 heads), causal and not, one GQA row."""
    seqs = [4096] if quick else SEQ
    shapes = []
    for d, heads in ((128, 16), (64, 32)):
        for causal in (False, True):
            shapes += [(TOKENS // s, heads, heads, s, d, torch.bfloat16, causal) for s in seqs]
    shapes.append((TOKENS // 4096, 32, 8, 4096, 128, torch.bfloat16, True))  # Llama-3-8B-like GQA
    return shapes


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return run


def _cases(args, b, hq, hkv, s, d, dtype, causal, attention, reference):
    q = torch.randn(b, hq, s, d, device=args.device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=args.device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=args.device, dtype=dtype, requires_grad=True)
    fns = {"triton": lambda: attention(q, k, v, causal), "torch": lambda: reference(q, k, v, causal)}
    if args.device == "cuda":
        from torch.nn.attention import SDPBackend

        for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            fn = _sdpa(backend)
            fns[name] = lambda fn=fn: fn(q, k, v, causal)
    flops = 4 * b * s * s * hq * d / (2 if causal else 1)
    label = f"B{b} H{hq}/{hkv} S{s} D{d} {'causal' if causal else 'full'}"
    bwd = {name: common.backward_of(fn, [q, k, v]) for name, fn in fns.items()}
    policy = {"op": "attention", "dtype": str(dtype).removeprefix("torch."),
              "shape": {"head_dim": d, "causal": causal, "seq_len": s, "q_heads": hq, "kv_heads": hkv}}
    return [common.Case(label, "fwd", fns, flops=flops, notes={"policy": policy}),
            common.Case(label, "bwd", bwd, flops=2.5 * flops, notes={"policy": policy})]


def packed_shapes(quick: bool):
    """(B, Hq, Hkv, S, D, dtype, doc_len): hdim 128, documents of DOC_LEN tokens, one GQA row."""
    seqs = [4096] if quick else [2048, 4096, 8192, 16384]
    shapes = [(TOKENS // s, 16, 16, s, 128, torch.bfloat16, DOC_LEN) for s in seqs]
    shapes.append((TOKENS // 4096, 32, 8, 4096, 128, torch.bfloat16, DOC_LEN))
    return shapes


def _packed_cases(args, b, hq, hkv, s, d, dtype, doc_len, attention, reference):
    q = torch.randn(b, hq, s, d, device=args.device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=args.device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=args.device, dtype=dtype, requires_grad=True)
    seg = (torch.arange(s, device=args.device) // doc_len).expand(b, s).contiguous()  # (B, S) document ids
    fns = {"triton": lambda: attention(q, k, v, True, segments=seg),
           "torch": lambda: reference(q, k, v, True, segments=seg)}  # SDPA with the (B, 1, S, S) mask
    docs = [doc_len] * (s // doc_len) + ([s % doc_len] if s % doc_len else [])
    flops = 4 * b * hq * d * sum(n * n for n in docs) / 2
    label = f"B{b} H{hq}/{hkv} S{s} D{d} packed doc{doc_len}"
    bwd = {name: common.backward_of(fn, [q, k, v]) for name, fn in fns.items()}
    policy = {"op": "attention", "dtype": str(dtype).removeprefix("torch."),
              "shape": {"head_dim": d, "causal": True, "seq_len": s, "q_heads": hq, "kv_heads": hkv,
                        "doc_len": doc_len}}
    return [common.Case(label, "fwd", fns, flops=flops, notes={"policy": policy}),
            common.Case(label, "bwd", bwd, flops=2.5 * flops, notes={"policy": policy})]


def main(argv=None):
    args = common.setup("bench_attention", __doc__, argv)
    from megatrain.ops.attention import attention_reference
    from megatrain.triton_kernels.flash_attention import attention

    shapes = SMOKE if args.smoke else gpu_shapes(args.quick)
    cases = [c for shape in shapes for c in _cases(args, *shape, attention, attention_reference)]
    packed = SMOKE_PACKED if args.smoke else packed_shapes(args.quick)
    cases += [c for shape in packed for c in _packed_cases(args, *shape, attention, attention_reference)]
    common.run(args, cases)


if __name__ == "__main__":
    main()
