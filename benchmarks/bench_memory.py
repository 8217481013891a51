"""Memory per rank under DeepSpeed, measured: bytes per model parameter for each ZeRO stage, precision and dp size.

Each configuration is a real multi-rank Trainer (gloo on CPU; NCCL on GPUs) run by ``megatrain.plan.measure``,
which counts the bytes of all live tensors on each rank's device at five points of a training step: after setup,
at the end of the forward, inside the backward, after the backward and after the optimizer step. The table divides
by the model's parameter count ψ; a constant part (a bucket whose size is set in elements, not by the model) is
split off by running two model sizes. Prints a table and writes JSON.

    python benchmarks/bench_memory.py                 # tiny Llamas on CPU, dp 1-2, ZeRO 0-3, fp32 and bf16
    python benchmarks/bench_memory.py --cases 2:3:bf16,4:3:bf16 [--section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatrain.plan.measure import POINTS  # noqa: E402

DEFAULT_CASES = "1:0:fp32,1:1:fp32,2:1:fp32,2:2:fp32,2:3:fp32,1:0:bf16,2:1:bf16,2:2:bf16,2:3:bf16"  # dp:zero:precision
SIZES = (256, 384)  # model.hidden_size of the two models (4 layers, ffn 2×hidden)


def measure_case(dp: int, zero: int, precision: str, hidden: int, rest: list[str]) -> dict:
    from megatrain.testing import run_ranks
    with tempfile.TemporaryDirectory() as log_dir:
        overrides = ["--model.arch=llama", f"--model.hidden_size={hidden}", "--model.num_layers=4", "--model.num_heads=4",
                     "--model.num_kv_heads=2", f"--model.ffn_hidden_size={2 * hidden}", "--model.max_seq_len=64",
                     "--data.seq_len=32", f"--parallel.zero_stage={zero}", f"--train.precision={precision}",
                     f"--train.global_batch_size={2 * dp}", "--train.micro_batch_size=2", "--train.warmup_steps=0",
                     f"--log.dir={log_dir}", "--log.progress=none", "--log.tensorboard=false", "--log.report=false",
                     "--log.hang_report_s=0", "--checkpoint.save_final=false", *rest]
        results = run_ranks(dp, ["-m", "megatrain.plan.measure", *overrides], timeout=900)
    ranks = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    return {"params": ranks[0]["params"], **{p: max(r[p] for r in ranks) for p in POINTS}}


def main():
    import common
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated dp:zero:precision")
    parser.add_argument("--out", default="benchmarks/results/bench_memory.json")
    args, rest = parser.parse_known_args()
    rows = []
    for spec in args.cases.split(","):
        dp, zero, precision = spec.split(":")
        small, large = (measure_case(int(dp), int(zero), precision, h, rest) for h in SIZES)
        dpsi = large["params"] - small["params"]
        row = {"dp": int(dp), "zero": int(zero), "precision": precision, "params": [small["params"], large["params"]]}
        for p in POINTS:  # bytes = a·ψ + c per rank, from the two sizes
            a = (large[p] - small[p]) / dpsi
            row[f"{p}_bytes_per_param"] = round(a, 2)
            row[f"{p}_constant_mb"] = round((small[p] - a * small["params"]) / 2**20, 1)
        rows.append(row)
        print(f"dp {dp} zero {zero} {precision}: " + "  ".join(
            f"{p} {row[f'{p}_bytes_per_param']:.2f}+{row[f'{p}_constant_mb']:.0f}MB" for p in POINTS), flush=True)
    print("\nbytes per parameter per rank (+ constant MB), the busiest rank:")
    print(f"{'dp':>3s} {'zero':>4s} {'prec':>5s} " + " ".join(f"{p:>17s}" for p in POINTS))
    for r in rows:
        print(f"{r['dp']:3d} {r['zero']:4d} {r['precision']:>5s} " + " ".join(
            f"{r[f'{p}_bytes_per_param']:7.2f} +{r[f'{p}_constant_mb']:6.0f}MB" for p in POINTS))
    record = {**common.run_header("bench_memory", device="cuda" if _cuda() else "cpu", config="tiny llama",
                                  overrides=rest), "rows": rows}
    print(f"wrote {common.save_record(args.out, record)}")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
