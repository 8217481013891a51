"""`make demo`: prepare the embedded corpus, pretrain the tiny GPT on 2 CPU ranks under DeepSpeed, summarise.

    python -m megatrain.demo [--recipe recipes/tiny_cpu_gpt.yaml] [--ranks 2] [extra --section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from megatrain.testing import ROOT, free_port


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if subprocess.call(cmd, cwd=ROOT, env=env) != 0:
        raise SystemExit(f"demo: command failed: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny_cpu_gpt.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    args, extra = parser.parse_known_args(argv)
    from megatrain.config import load_config
    cfg = load_config(os.path.join(ROOT, args.recipe), extra)

    _run([sys.executable, "launch/prepare.py", "--config", args.recipe, *extra])
    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
          "--master_port", str(free_port()), "launch/pretrain.py", "--config", args.recipe, *extra])

    with open(os.path.join(ROOT, cfg.log.dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    first, last = rows[0], rows[-1]
    val = [r for r in rows if "val_loss" in r]
    print("\n== demo summary ==")
    print(f"train loss  step {first['step']}: {first['loss']:.3f}  ->  step {last['step']}: {last['loss']:.3f}")
    if val:
        print(f"validation  loss {val[-1]['val_loss']:.3f}, perplexity {val[-1]['val_ppl']:.1f} (step {val[-1]['step']})")
    tps = sorted(r["tokens_per_s"] for r in rows)
    print(f"throughput  median {tps[len(tps) // 2]:.0f} tokens/s over {len(rows)} logged steps")
    run_dir = os.path.join(ROOT, cfg.log.dir)
    print(f"run dir     {run_dir}: metrics.jsonl, tb/, checkpoints/, report.png")
    if last["loss"] >= first["loss"]:
        raise SystemExit("demo: the loss did not fall")


if __name__ == "__main__":
    main()
