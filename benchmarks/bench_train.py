"""Tokens/s of megatrain's training loop (Trainer on the DeepSpeed engine) vs a bare torch loop.

Same model, optimizer (the AdamW ``megatrain.ops.make_adamw`` picks: the C++ one on CPU, for both loops),
schedule, clipping, batches, one process, measured side by side in one run: the loops alternate every step
(which goes first alternates too) so machine noise hits both alike. Prints median [min, max] per step, the
load averages, and writes JSON.

    python benchmarks/bench_train.py [--config recipes/tiny_cpu_gpt.yaml] [--steps 30] [--section.key=value]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/tiny_cpu_gpt.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each loop (after 2 warm-up steps)")
    parser.add_argument("--out", default="benchmarks/results/bench_train.json")
    args, rest = parser.parse_known_args()
    overrides = ["--log.progress=none", "--log.tensorboard=false", "--log.report=false", "--log.dir=/tmp/bench_train",
                 "--checkpoint.save_final=false", "--parallel.zero_stage=0", *rest]
    cfg = load_config(args.config, overrides)

    from megatrain.data.prepare import prepare_corpus
    from megatrain.train.trainer import Trainer
    prepare_corpus(cfg.data, seed=cfg.train.seed)
    trainer = Trainer(cfg)
    from megatrain.data.sampler import GlobalBatchSampler
    from megatrain.models.transformer import build_transformer
    model = build_transformer(cfg.model, seed=cfg.train.seed).to(trainer.device)  # same init as the Trainer's
    ds = trainer.train_data
    bare = common.hand_loop(cfg, model, ds, GlobalBatchSampler(len(ds), cfg.train.global_batch_size, cfg.train.seed),
                            micro=cfg.train.global_batch_size // cfg.train.micro_batch_size, device=trainer.device)

    def mega():
        trainer.train_step()
        trainer.step += 1
        return cfg.train.global_batch_size * cfg.seq_len

    common.alternate({"mega": mega, "bare": bare}, 2)  # warm-up: allocator, first-call overheads
    load_before = common.load_averages()
    times = common.alternate({"mega": mega, "bare": bare}, args.steps)
    tokens = cfg.train.global_batch_size * cfg.seq_len
    mega_s, bare_s = common.spread(times["mega"]), common.spread(times["bare"])
    print(f"\nmodel {cfg.model.arch} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{tokens} tokens/step, {args.steps} steps each, alternating every step, torch threads "
          f"{torch.get_num_threads()}, load averages before/after {load_before} / {common.load_averages()}")
    print(f"{'loop':40s} {'tokens/s median [min, max]':>30s} {'ms/step median':>15s}")
    for name, sp in (("megatrain Trainer (DeepSpeed engine)", mega_s), ("bare torch loop, same AdamW", bare_s)):
        tps = {"median": tokens / sp["median"], "min": tokens / sp["max"], "max": tokens / sp["min"]}
        print(f"{name:40s} {common.fmt_spread(tps):>30s} {sp['median'] * 1e3:15.1f}")
    ratio = bare_s["median"] / mega_s["median"]
    print(f"ratio megatrain / bare = {ratio:.3f} (target >= 0.95)")
    result = {**common.run_header("bench_train", device=str(trainer.device), config=args.config, overrides=overrides),
              "tokens_per_step": tokens, "megatrain_tokens_per_s": tokens / mega_s["median"],
              "bare_tokens_per_s": tokens / bare_s["median"], "ratio": ratio, "megatrain_step_s": times["mega"],
              "bare_step_s": times["bare"], "load_averages": [load_before, common.load_averages()],
              "optimizer": type(trainer.optimizer).__name__}
    common.save_record(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
