"""q/k/v projections, forward + backward: three Linears (what megatrain's Attention runs) vs one fused GEMM.

The question is whether a fused q/k/v projection is worth its cost on this machine. The costs are the HF key
maps, LoRA's per-projection targets and the kv-head tensor-parallel rules, which all see three tensors today.
Two fused forms are timed:
- ``fused (cat)``: the three weights concatenated at every call, one GEMM. Parameters stay as they are, so
  nothing else changes.
- ``fused (stored)``: one stored (q+2·kv, H) weight. This is the best any fusion can do, and it would need
  the parameter layout changed everywhere.
The variants alternate every round (the first rotates). Each shape prints median [min, max] ms and the
speed-up over three Linears. JSON goes to benchmarks/results/bench_qkv.json.

    python benchmarks/bench_qkv.py [--rounds 30] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (tokens, hidden, q heads, kv heads, head dim): the demo GPT-2 (8x128 tokens of width 128), the tiny Llama's
# GQA, then widths a CPU still trains
SHAPES = [(1024, 128, 4, 4, 32), (1024, 256, 8, 2, 32), (2048, 512, 8, 8, 64), (2048, 1024, 16, 4, 64)]


def variants(tokens: int, hidden: int, hq: int, hkv: int, d: int, device: str) -> dict:
    """One fwd+bwd step per variant, on the same input and output gradient."""
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    sizes = [hq * d, hkv * d, hkv * d]
    ws = [torch.randn(n, hidden, device=device, requires_grad=True) for n in sizes]  # q, k, v weights
    bs = [torch.randn(n, device=device, requires_grad=True) for n in sizes]
    stored_w = torch.cat(ws).detach().requires_grad_()  # (q+2kv, H)
    stored_b = torch.cat(bs).detach().requires_grad_()
    grads = torch.randn(tokens, sum(sizes), device=device).split(sizes, dim=-1)

    def separate():
        outs = [F.linear(x, w, b) for w, b in zip(ws, bs)]  # 3 x (N, n)
        torch.autograd.backward(outs, list(grads))

    def fused_cat():
        outs = F.linear(x, torch.cat(ws), torch.cat(bs)).split(sizes, dim=-1)  # one (N, q+2kv) GEMM
        torch.autograd.backward(list(outs), list(grads))

    def fused_stored():
        outs = F.linear(x, stored_w, stored_b).split(sizes, dim=-1)
        torch.autograd.backward(list(outs), list(grads))

    def zero():
        for t in (x, *ws, *bs, stored_w, stored_b):
            t.grad = None

    def step(fn):
        def run():
            fn()
            zero()
        return run

    # the fused forms must compute what three Linears compute
    separate()
    want = [t.grad.clone() for t in (x, *ws, *bs)]
    zero()
    fused_cat()
    got = [t.grad.clone() for t in (x, *ws, *bs)]
    zero()
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    return {"three Linears": step(separate), "fused (cat)": step(fused_cat), "fused (stored)": step(fused_stored)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "bench_qkv.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = common.run_header("bench_qkv", device=args.device, config="", overrides=[])
    record.update({"threads": torch.get_num_threads(), "rounds": args.rounds, "shapes": []})
    load_before = common.load_averages()
    print(f"{'tokens x hidden (heads q/kv)':30s} {'three Linears ms':>26s} {'fused (cat) ms':>26s} "
          f"{'fused (stored) ms':>26s} {'cat x':>7s} {'stored x':>9s}")
    for tokens, hidden, hq, hkv, d in SHAPES:
        fns = variants(tokens, hidden, hq, hkv, d, args.device)
        common.alternate(fns, 3)  # warm-up
        times = common.alternate(fns, args.rounds)
        ms = {k: common.spread([t * 1e3 for t in v]) for k, v in times.items()}
        base = ms["three Linears"]["median"]
        speedup = {k: base / v["median"] for k, v in ms.items()}
        print(f"{f'{tokens}x{hidden} ({hq}/{hkv})':30s} "
              + " ".join(f"{common.fmt_spread(ms[k], fmt='{:.3f}'):>26s}" for k in fns)
              + f" {speedup['fused (cat)']:7.3f} {speedup['fused (stored)']:9.3f}", flush=True)
        record["shapes"].append({"tokens": tokens, "hidden": hidden, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                                 "ms": ms, "speedup_vs_three_linears": speedup})
    record["load_averages"] = [load_before, common.load_averages()]
    print(f"torch threads {record['threads']}; load averages before/after {load_before} / "
          f"{record['load_averages'][1]}")
    print("wrote", common.save_record(args.out, record))


if __name__ == "__main__":
    main()
