"""`make demo`: prepare the embedded corpus, pretrain the tiny GPT on 2 CPU ranks (started by
megatrain.distributed.local_launch; the DeepSpeed engine trains), summarise.
`make demo-sft`: pretrain the tiny Llama briefly, fine-tune it with LoRA on the shipped chat data
(recipes/sft_lora_tiny.yaml: assistant-token loss, packed documents), then answer held-out chat prompts.

    python -m megatrain.demo [--recipe recipes/tiny_cpu_gpt.yaml] [--ranks 2] [extra --section.key=value ...]
    python -m megatrain.demo --sft [--base_steps 150] [extra overrides for the fine-tuning run ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from megatrain.distributed.local_launch import free_port
from megatrain.testing import ROOT


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("$ " + " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd]), flush=True)
    env = {**os.environ, **(env or {}), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if subprocess.call(cmd, cwd=ROOT, env=env) != 0:
        raise SystemExit(f"demo: command failed: {' '.join(cmd)}")


def train_command(recipe: str, ranks: int, extra: list[str], port: int | None = None) -> tuple[list[str], dict]:
    """(argv, extra environment) of the demo's training launch: megatrain's local launcher, whose parent imports
    no torch (torchrun's imports it before starting a rank; benchmarks/bench_startup.py times both). It sets the
    per-rank thread count (cores ÷ ranks) unless the user set OMP_NUM_THREADS."""
    return ([sys.executable, "-m", "megatrain.distributed.local_launch", "--nproc", str(ranks), "--port",
             str(port or free_port()), "launch/pretrain.py", "--config", recipe, *extra], {})


def _train(recipe: str, ranks: int, extra: list[str]) -> None:
    _run([sys.executable, "launch/prepare.py", "--config", recipe, *extra])
    _run(*train_command(recipe, ranks, extra))


def _rows(log_dir: str) -> list[dict]:
    with open(os.path.join(ROOT, log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


SFT_RECIPE = "recipes/sft_lora_tiny.yaml"
SFT_BASE_RECIPE = "recipes/tiny_cpu_llama.yaml"


def sft(ranks: int, base_steps: int, extra: list[str]) -> None:
    """Base pretraining (tiny Llama on the embedded corpus), LoRA SFT on chat_demo, generation on held-out prompts."""
    from megatrain.config import load_config
    cfg = load_config(os.path.join(ROOT, SFT_RECIPE), extra)
    base = os.path.dirname(cfg.model.init_from.rstrip("/"))  # runs/sft_base from runs/sft_base/checkpoints
    _train(SFT_BASE_RECIPE, ranks, [f"--train.max_steps={base_steps}", "--train.eval_every=0",
                                    "--checkpoint.every=0", f"--log.dir={base}", "--log.report=false"])
    _train(SFT_RECIPE, ranks, extra)
    out = os.path.join(cfg.log.dir, "generations.jsonl")
    _run([sys.executable, "launch/generate.py", "--model", cfg.log.dir, "--prompts", "recipes/sft_prompts.jsonl",
          "--max_new_tokens", "24", "--threads", "1", "--output", out])
    rows = _rows(cfg.log.dir)
    val = [r for r in rows if "val_loss" in r]
    print("\n== SFT demo summary ==")
    print(f"assistant-token loss  step {rows[0]['step']}: {rows[0]['loss']:.3f}  ->  step {rows[-1]['step']}: "
          f"{rows[-1]['loss']:.3f}" + (f"   (validation {val[-1]['val_loss']:.3f})" if val else ""))
    with open(os.path.join(ROOT, out), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            print(f"  {r['messages'][-1]['content']!r:45} -> {r['completion'].strip()[:60]!r}")
    print(f"run dir  {os.path.join(ROOT, cfg.log.dir)}: checkpoints/, adapter/ (PEFT), generations.jsonl")
    if rows[-1]["loss"] >= rows[0]["loss"]:
        raise SystemExit("demo: the SFT loss did not fall")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny_cpu_gpt.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sft", action="store_true", help="the fine-tuning demo (recipes/sft_lora_tiny.yaml)")
    parser.add_argument("--base_steps", type=int, default=150, help="--sft: steps of base pretraining")
    args, extra = parser.parse_known_args(argv)
    if args.sft:
        return sft(args.ranks, args.base_steps, extra)
    from megatrain.config import load_config
    cfg = load_config(os.path.join(ROOT, args.recipe), extra)
    _train(args.recipe, args.ranks, extra)

    rows = _rows(cfg.log.dir)
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
