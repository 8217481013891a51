"""Full fine-tuning vs LoRA on the same model: tokens/s, trainable parameters, optimizer bytes, peak memory per rank.

Each mode is two real multi-rank launches (gloo on CPU, NCCL on GPUs) of the same Llama on the same data and
layout: ``launch/pretrain.py`` for throughput (median tokens/s after warm-up steps) and ``megatrain.plan.measure``
for memory (bytes of all live tensors on each rank's device through a training step; the peak is the largest of
its five points on the busiest rank). Optimizer bytes are the fp32 master copy + Adam moments as the planner
predicts them (megatrain/plan/memory.py, tested against the live tensors in tests/dist/test_lora_plan.py), with
DeepSpeed holding state only for trainable parameters. Prints a table, writes JSON.

    python benchmarks/bench_finetune.py                       # a 4-layer Llama on CPU, 2 ranks, ZeRO-1
    python benchmarks/bench_finetune.py --ranks 8 --lora-rank 16 [--section.key=value ...]   # e.g. on GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatrain.plan.measure import POINTS  # noqa: E402

MODEL = ["--model.arch=llama", "--model.hidden_size=256", "--model.num_layers=4", "--model.num_heads=4",
         "--model.num_kv_heads=2", "--model.ffn_hidden_size=688", "--model.max_seq_len=128"]
TARGETS = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'


def prepare_data(path: str) -> str:
    """A small corpus of this machine's Python standard library (the project's embedded source), once."""
    from megatrain.config import build_config
    from megatrain.data.prepare import prepare_corpus
    cfg = build_config({"data": {"path": path, "sources": ["stdlib"], "vocab_size": 1024, "max_bytes": 2_000_000,
                                 "val_fraction": 0.02, "num_workers": 1}})
    prepare_corpus(cfg.data, seed=0)
    return path


def common_args(args, log_dir: str, lora: bool, rest: list[str]) -> list[str]:
    mode = [f"--model.lora.rank={args.lora_rank}", f"--model.lora.alpha={2 * args.lora_rank}",
            f"--model.lora.targets={TARGETS}"] if lora else []
    return [*MODEL, *mode, f"--data.path={args.data}", "--data.seq_len=128", f"--parallel.zero_stage={args.zero}",
            f"--train.global_batch_size={4 * args.ranks}", "--train.micro_batch_size=4", "--train.warmup_steps=0",
            "--train.eval_every=0", "--train.lr=1e-3", f"--log.dir={log_dir}", "--log.progress=none",
            "--log.tensorboard=false", "--log.report=false", "--log.hang_report_s=0", "--checkpoint.save_final=false",
            *rest]


def train_run(args, lora: bool, rest: list[str]) -> list[dict]:
    """One launch/pretrain.py run: its metrics records."""
    from megatrain.testing import run_ranks
    with tempfile.TemporaryDirectory() as log_dir:
        run_ranks(args.ranks, ["launch/pretrain.py", *common_args(args, log_dir, lora, rest),
                               f"--train.max_steps={args.steps}"], timeout=1800)
        with open(os.path.join(log_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]


def run_mode(args, lora: bool, runs: list[list[dict]], rest: list[str]) -> dict:
    from megatrain.testing import run_ranks
    recs = runs[0]
    with tempfile.TemporaryDirectory() as log_dir:
        args_measure = common_args(args, log_dir, lora, rest)
        results = run_ranks(args.ranks, ["-m", "megatrain.plan.measure", *args_measure], timeout=1800)
    ranks = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    from megatrain.config import load_config
    from megatrain.plan import plan_memory, with_vocab
    cfg = with_vocab(load_config(None, args_measure))
    rows = plan_memory(cfg, world_size=args.ranks)
    # the best run's median: other processes on a shared machine only ever slow a run down
    per_run = [statistics.median(r["tokens_per_s"] for r in run[args.warmup:]) for run in runs]
    return {"mode": f"lora r={args.lora_rank}" if lora else "full",
            "tokens_per_s": max(per_run), "tokens_per_s_runs": [round(v) for v in per_run],
            "params": ranks[0]["params"], "steps": len(recs), "trainable_per_rank": max(r["local_trainable"] for r in ranks),
            "params_per_rank": max(r["local_params"] for r in ranks),
            "optimizer_mb_per_rank": max(r.master + r.adam for r in rows) / 2**20,
            "states_after_step_mb": max(r["step"] for r in ranks) / 2**20,
            "peak_mb_per_rank": max(max(r[p] for p in POINTS) for r in ranks) / 2**20,
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"]}


def main():
    import common
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks")
    parser.add_argument("--zero", type=int, default=1, help="parallel.zero_stage")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the tokens/s median")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per mode (alternating); best kept")
    parser.add_argument("--data", default="data_cache/bench_finetune", help="prepared data (made if missing)")
    parser.add_argument("--out", default="benchmarks/results/bench_finetune.json")
    args, rest = parser.parse_known_args()
    prepare_data(args.data)
    runs = {False: [], True: []}
    for _ in range(args.repeats):  # the two modes alternate, so a busy moment of the machine hits both
        for lora in (False, True):
            runs[lora].append(train_run(args, lora, rest))
    rows = []
    for lora in (False, True):
        row = run_mode(args, lora, runs[lora], rest)
        rows.append(row)
        print(f"{row['mode']}: {row['tokens_per_s']:.0f} tok/s, trainable {row['trainable_per_rank']:,}/rank, "
              f"optimizer {row['optimizer_mb_per_rank']:.2f} MB, peak {row['peak_mb_per_rank']:.1f} MB", flush=True)
    print(f"\n{args.ranks} ranks, ZeRO-{args.zero}, {rows[0]['params']:,} parameters (the LoRA model: "
          f"{rows[1]['params']:,} with adapters)")
    print(f"{'mode':>10s} {'tokens/s':>9s} {'trainable/rank':>15s} {'optimizer MB/rank':>18s} "
          f"{'states MB/rank':>15s} {'peak MB/rank':>13s} {'loss first→last':>17s}")
    for r in rows:
        print(f"{r['mode']:>10s} {r['tokens_per_s']:9.0f} {r['trainable_per_rank']:15,d} "
              f"{r['optimizer_mb_per_rank']:18.2f} {r['states_after_step_mb']:15.1f} {r['peak_mb_per_rank']:13.1f} "
              f"{r['loss_first']:8.3f}→{r['loss_last']:.3f}")
    print("peak = the busiest of five points of a step on the busiest rank, DeepSpeed's reduce bucket included "
          "(reduce_bucket_size elements whatever the model: 500M x 4 B by default); states = weights + master + "
          "Adam after the step")
    import torch
    record = {**common.run_header("bench_finetune", device="cuda" if torch.cuda.is_available() else "cpu",
                                  config="llama 256x4 (ffn 688), seq 128", overrides=rest),
              "ranks": args.ranks, "zero_stage": args.zero, "steps": args.steps, "rows": rows}
    print(f"wrote {common.save_record(args.out, record)}")


if __name__ == "__main__":
    main()
