"""Distillation step time with a live teacher vs a precomputed top-k teacher cache, and the cache's size on disk.

Same student, data order, optimizer and schedule under the Trainer (DeepSpeed engine), one process, measured side
by side in one run: the two trainers alternate in rounds so machine noise hits both alike. The cache is written
first (its build time is reported) for the samples the timed steps read. Prints a table and writes JSON.

    python benchmarks/bench_distill_cache.py [--config recipes/prune_distill_tiny.yaml] [--steps 10] [--rounds 3]
        [--topk 32] [--section.key=value ...]

Needs the recipe's teacher (distill.teacher) and student (distill.student): `make demo`, then
`python launch/prune.py --config recipes/prune_distill_tiny.yaml`.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402


def timed_steps(trainer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
        trainer.step += 1
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/prune_distill_tiny.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/bench_distill_cache.json")
    args, rest = parser.parse_known_args()
    overrides = ["--log.progress=none", "--log.tensorboard=false", "--log.report=false",
                 "--log.dir=/tmp/bench_distill_cache", "--checkpoint.save_final=false", "--train.eval_every=0", *rest]
    cfg = load_config(args.config, overrides)
    d = cfg.distill
    for field, path in (("distill.teacher", d.teacher), ("distill.student", d.student)):
        if not path or not os.path.isdir(path):
            sys.exit(f"{field}={path} not found; run `make demo` and "
                     f"`python launch/prune.py --config {args.config}` first")

    from megatrain.compress.distill import DistillationTask
    from megatrain.weights.sources import load_model
    from megatrain.compress.passes import with_fields
    from megatrain.compress.teacher_cache import tensor_crc, write_manifest, write_teacher_cache
    from megatrain.distributed.env import init_distributed
    from megatrain.train.lm_task import LanguageModelingTask
    from megatrain.train.trainer import Trainer

    lm = LanguageModelingTask(cfg)
    student, student_cfg = load_model(d.student)
    teacher, teacher_cfg = load_model(d.teacher)
    cfg = with_fields(cfg, model=student_cfg)
    init_distributed()
    total_steps = 2 + args.rounds * args.steps  # 2 warm-up steps, then the timed ones
    train = lm.train_dataset()
    samples = min(len(train), total_steps * cfg.train.global_batch_size)

    cache_dir = tempfile.mkdtemp(prefix="teacher_cache_")
    try:
        t0 = time.perf_counter()
        manifest = write_teacher_cache(cache_dir, teacher.eval(), train, k=args.topk, temperature=d.temperature,
                                       vocab_size=cfg.model.vocab_size, value_dtype=d.cache_dtype,
                                       num_samples=samples, micro_batch_size=cfg.train.micro_batch_size,
                                       teacher_info={"path": d.teacher, "weights_crc32": tensor_crc(teacher)},
                                       log=lambda m: None)
        write_manifest(cache_dir, manifest)
        build_s = time.perf_counter() - t0
        cache_bytes = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
        per_token = cache_bytes / (samples * cfg.seq_len)

        cached_cfg = with_fields(cfg, distill__teacher_cache=cache_dir, distill__teacher=None)
        live = Trainer(cfg, DistillationTask(cfg, teacher=(teacher, teacher_cfg), student=copy.deepcopy(student)))
        cached = Trainer(cached_cfg, DistillationTask(cached_cfg, student=copy.deepcopy(student)))
        timed_steps(live, 2), timed_steps(cached, 2)  # warm-up: allocator, first-call overheads
        live_t, cached_t = [], []
        for _ in range(args.rounds):
            live_t += timed_steps(live, args.steps)
            cached_t += timed_steps(cached, args.steps)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    tokens = cfg.train.global_batch_size * cfg.seq_len
    live_s, cached_s = statistics.median(live_t), statistics.median(cached_t)
    print(f"\nstudent {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, teacher "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M, vocab {cfg.model.vocab_size}, {tokens} "
          f"tokens/step, {args.rounds}x{args.steps} steps each, interleaved, torch threads {torch.get_num_threads()}")
    print(f"{'teacher':34s} {'ms/step (median)':>17s} {'tokens/s':>10s}")
    for name, s in (("live (forward every step)", live_s), (f"cached (top-{args.topk}, {d.cache_dtype})", cached_s)):
        print(f"{name:34s} {s * 1e3:17.1f} {tokens / s:10.0f}")
    print(f"speed-up cached / live = {live_s / cached_s:.2f}x")
    full_mb = per_token * len(train) * cfg.seq_len / 2**20
    print(f"cache: {samples} samples, {cache_bytes / 2**20:.2f} MiB ({per_token:.0f} B/token), written in "
          f"{build_s:.1f} s; the whole training split ({len(train)} samples) would take {full_mb:.0f} MiB")
    result = {**common.run_header("bench_distill_cache", device=str(live.device), config=args.config, overrides=overrides),
              "topk": args.topk,
              "value_dtype": d.cache_dtype, "tokens_per_step": tokens, "live_step_s": live_t,
              "cached_step_s": cached_t, "live_median_s": live_s, "cached_median_s": cached_s,
              "speedup": live_s / cached_s, "cache_samples": samples, "cache_bytes": cache_bytes,
              "cache_bytes_per_token": per_token, "cache_build_s": build_s,
              "full_split_samples": len(train), "full_split_cache_mib": full_mb}
    common.save_record(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
