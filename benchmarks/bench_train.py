"""Tokens/s of megatrain's training loop (Trainer on the DeepSpeed engine) vs a bare torch loop.

Same model, optimizer (AdamW), schedule, clipping, batches, one process, measured side by side in one run:
the two loops alternate in rounds so machine noise hits both alike. Prints a table and writes JSON.

    python benchmarks/bench_train.py [--config recipes/tiny_cpu_gpt.yaml] [--steps 10] [--rounds 3] [--section.key=value]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402


def bare_loop(cfg, model, dataset, sampler, device):
    """The loop a user would write by hand: forward, CE, backward, clip, AdamW, scheduler."""
    from megatrain.train.regularization import param_groups
    from megatrain.train.schedules import lr_multiplier
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(t))
    accum = t.global_batch_size // t.micro_batch_size
    state = {"step": 0}

    def step():
        idx = sampler.indices_for_step(state["step"])
        for m in range(accum):
            items = [dataset[i] for i in idx[m * t.micro_batch_size:(m + 1) * t.micro_batch_size]]
            x = torch.stack([it["input_ids"] for it in items]).to(device)
            y = torch.stack([it["labels"] for it in items]).to(device)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        state["step"] += 1
        return accum * t.micro_batch_size * x.shape[1]

    return step


def timed(fn, n):
    times, items = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        items = fn()
        times.append(time.perf_counter() - t0)
    return items, times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/tiny_cpu_gpt.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
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
    bare = bare_loop(cfg, model, ds, GlobalBatchSampler(len(ds), cfg.train.global_batch_size, cfg.train.seed),
                     trainer.device)

    def mega():
        trainer.train_step()
        trainer.step += 1
        return cfg.train.global_batch_size * cfg.seq_len

    timed(mega, 2), timed(bare, 2)  # warm-up: allocator, first-call overheads
    mega_t, bare_t = [], []
    for _ in range(args.rounds):
        tokens, t = timed(mega, args.steps)
        mega_t += t
        _, t = timed(bare, args.steps)
        bare_t += t
    mega_tps, bare_tps = tokens / statistics.median(mega_t), tokens / statistics.median(bare_t)
    rows = [("megatrain Trainer (DeepSpeed engine)", mega_tps, statistics.median(mega_t)),
            ("bare torch loop", bare_tps, statistics.median(bare_t))]
    print(f"\nmodel {cfg.model.arch} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{tokens} tokens/step, {args.rounds}x{args.steps} steps each, interleaved, torch threads {torch.get_num_threads()}")
    print(f"{'loop':40s} {'tokens/s':>10s} {'ms/step (median)':>18s}")
    for name, tps, t in rows:
        print(f"{name:40s} {tps:10.0f} {t * 1e3:18.1f}")
    ratio = mega_tps / bare_tps
    print(f"ratio megatrain / bare = {ratio:.3f} (target >= 0.95)")
    result = {**common.run_header("bench_train", device=str(trainer.device), config=args.config, overrides=overrides),
              "tokens_per_step": tokens, "megatrain_tokens_per_s": mega_tps, "bare_tokens_per_s": bare_tps,
              "ratio": ratio, "megatrain_step_s": mega_t, "bare_step_s": bare_t}
    common.save_record(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
