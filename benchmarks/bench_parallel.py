"""Tokens/s and communicated bytes per step for each parallel layout of one model.

Each layout is a real multi-rank run of launch/pretrain.py (gloo on CPU, NCCL on GPUs) with
MEGATRAIN_COUNT_COMM=1, which logs rank 0's collective payload bytes per step. Prints a table, writes JSON.

    python benchmarks/bench_parallel.py                         # tiny GPT-2 on CPU, layouts up to 8 ranks
    python benchmarks/bench_parallel.py --config recipes/gpt2_124m.yaml --layouts 1x1x8,2x1x4,2x2x2   # GPUs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.testing import run_ranks  # noqa: E402

DEFAULT_LAYOUTS = "1x1x1,2x1x1,1x2x1,1x1x2,2x2x1,2x1x2,1x1x4,2x2x2"  # tp x pp x dp


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/tiny_cpu_gpt.yaml")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="comma-separated TPxPPxDP")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/bench_parallel.json")
    args, rest = parser.parse_known_args()
    rows = []
    for spec in args.layouts.split(","):
        tp, pp, dp = (int(v) for v in spec.split("x"))
        with tempfile.TemporaryDirectory() as log_dir:
            overrides = [f"--parallel.tp={tp}", f"--parallel.pp={pp}", f"--train.max_steps={args.steps}",
                         "--train.global_batch_size=16", "--train.micro_batch_size=2", "--train.eval_every=0",
                         f"--log.dir={log_dir}", "--log.progress=none", "--log.tensorboard=false", "--log.report=false",
                         "--checkpoint.save_final=false", *rest]
            run_ranks(tp * pp * dp, ["launch/pretrain.py", "--config", args.config, *overrides],
                      env={"MEGATRAIN_COUNT_COMM": "1"}, timeout=1800)
            with open(os.path.join(log_dir, "metrics.jsonl")) as f:
                recs = [json.loads(line) for line in f][2:]  # skip warm-up steps
        row = {"layout": spec, "tp": tp, "pp": pp, "dp": dp, "ranks": tp * pp * dp,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
               "comm_mb_per_step_rank0": statistics.mean(r["comm_bytes"] for r in recs) / 1e6,
               "loss_last": recs[-1]["loss"]}
        rows.append(row)
        print(f"{spec:>8s}  ranks {row['ranks']}  {row['tokens_per_s']:9.0f} tok/s  "
              f"{row['comm_mb_per_step_rank0']:9.2f} MB/step (rank 0)", flush=True)
    print(f"\n{'layout tp x pp x dp':>20s} {'ranks':>6s} {'tokens/s':>10s} {'comm MB/step/rank0':>19s} {'last loss':>10s}")
    for r in rows:
        print(f"{r['layout']:>20s} {r['ranks']:6d} {r['tokens_per_s']:10.0f} {r['comm_mb_per_step_rank0']:19.2f} {r['loss_last']:10.4f}")
    out = {"benchmark": "bench_parallel", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "config": args.config, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
