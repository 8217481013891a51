"""AdamW step throughput: megatrain's C++ CPU AdamW vs torch.optim.AdamW (foreach, fused) and DeepSpeed's
DeepSpeedCPUAdam, side by side on one flat fp32 tensor (a ZeRO-offload partition); plus a GPU section
(the CUDA fused AdamW vs torch fused/foreach and the Triton AdamW) when CUDA is present.

Bound: fp32 AdamW moves 28 B/param (read p, g, m, v; write p, m, v); the CPU table sets the achieved
bytes/s against a measured copy bandwidth (torch copy_ of a large buffer, read + write counted).

    python benchmarks/bench_adam.py            # 1e6 and 1e7 params
    python benchmarks/bench_adam.py --large    # adds 1e8 (needs ~3 GiB per variant)
    python benchmarks/bench_adam.py --no-deepspeed   # skip DeepSpeed's JIT build (about a minute)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BYTES_PER_PARAM = 28


def copy_floor(numel: int):
    """A torch copy_ moving the same 28 B/param (14 read + 14 written): the bandwidth floor, timed
    interleaved with the optimizers so machine noise hits it alike."""
    src = torch.randn(numel * 7 // 2)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def cpu_variants(numel: int, use_deepspeed: bool) -> tuple[dict, dict]:
    """name -> zero-arg step function, each over its own fp32 (p, g, m, v); name -> why it is missing."""
    variants, missing = {}, {}
    grad = torch.randn(numel)

    def torch_opt(**kw):
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = grad.clone()
        return torch.optim.AdamW([p], **HYPER, **kw).step

    try:
        from megatrain.ops.adamw import CPUAdamW

        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = grad.clone()
        variants["megatrain cpu_adam"] = CPUAdamW([p], **HYPER).step
    except Exception as exc:  # noqa: BLE001
        missing["megatrain cpu_adam"] = str(exc).splitlines()[0][:150]
    variants["torch fused"] = torch_opt(fused=True)
    variants["torch foreach"] = torch_opt(foreach=True)
    if use_deepspeed:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            p = torch.nn.Parameter(torch.randn(numel))
            p.grad = grad.clone()
            variants["deepspeed cpu_adam"] = DeepSpeedCPUAdam([p], **HYPER, adamw_mode=True).step
        except Exception as exc:  # noqa: BLE001  (its JIT build needs ninja and a compiler)
            missing["deepspeed cpu_adam"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    return variants, missing


def time_interleaved(variants: dict, rounds: int, reps: int) -> dict[str, list[float]]:
    """Per-step seconds for each variant; variants alternate so machine noise hits all of them alike."""
    for fn in variants.values():  # warm-up: lazy state allocation, first-touch page faults, JIT
        fn(), fn()
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return samples


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_at_start": os.getloadavg()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        info["deepspeed"] = None
    try:
        from megatrain.ops import extensions

        info["cpu_adam_isas"] = list(extensions.ops("cpu_adam").isas())
    except Exception:  # noqa: BLE001
        info["cpu_adam_isas"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run_cpu(sizes: list[int], use_deepspeed: bool, rounds: int) -> list[dict]:
    rows = []
    for numel in sizes:
        variants, missing = cpu_variants(numel, use_deepspeed)
        variants["copy (same bytes)"] = copy_floor(numel)
        reps = max(1, int(1e7 // numel))  # ~ the same wall time per size
        samples = time_interleaved(variants, rounds=rounds, reps=reps)
        copy_best = min(samples["copy (same bytes)"])
        copy_median = statistics.median(samples["copy (same bytes)"])
        for name, s in samples.items():
            best, median = min(s), statistics.median(s)
            rows.append({"section": "cpu", "params": numel, "variant": name, "ms_best": best * 1e3,
                         "ms_median": median * 1e3, "params_per_s_best": numel / best,
                         "gb_per_s_best": BYTES_PER_PARAM * numel / best / 1e9,
                         "pct_copy_best": 100 * copy_best / best, "pct_copy_median": 100 * copy_median / median,
                         "samples": len(s)})
        for name, why in missing.items():
            rows.append({"section": "cpu", "params": numel, "variant": name, "error": why})
        del variants
    return rows


def run_gpu(rounds: int) -> list[dict]:
    """CUDA fused AdamW vs torch (fused, foreach) and the Triton AdamW on a Llama-like tensor list."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    shapes = [(2048, 2048)] * 4 + [(5632, 2048)] * 2 + [(2048, 5632), (2048,), (2048,)]
    shapes = shapes * 16  # ~ 1.0e9 / 4 params: 16 layers of a 2048-hidden model
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    variants, missing = {}, {}

    def make(kind, **kw):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        if kind == "torch":
            return torch.optim.AdamW(ps, **HYPER, **kw).step
        from megatrain.ops.adamw import FusedAdamW
        return FusedAdamW(ps, **HYPER).step

    try:
        variants["megatrain fused_adam"] = make("megatrain")
    except Exception as exc:  # noqa: BLE001
        missing["megatrain fused_adam"] = str(exc).splitlines()[0][:150]
    variants["torch fused"] = make("torch", fused=True)
    variants["torch foreach"] = make("torch", foreach=True)
    try:
        from megatrain.triton_kernels.adamw import adamw_step

        ps = [p.clone() for p in params]
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        counter = [0]

        def triton_step():
            counter[0] += 1
            adamw_step(ps, grads, ms, vs, step=counter[0], lr=HYPER["lr"], beta1=HYPER["betas"][0],
                       beta2=HYPER["betas"][1], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])

        variants["triton adamw"] = triton_step
    except Exception as exc:  # noqa: BLE001
        missing["triton adamw"] = f"{type(exc).__name__}: {str(exc)[:150]}"
    rows = []
    best: dict[str, tuple] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            if do_bench is not None:
                res = tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
            else:
                fn(), torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    fn()
                end.record()
                torch.cuda.synchronize()
                res = (start.elapsed_time(end) / 10,) * 3
            if name not in best or res[0] < best[name][0]:
                best[name] = res
    for name, (p50, p20, p80) in best.items():
        tbs = BYTES_PER_PARAM * numel / (p50 * 1e-3) / 1e12
        rows.append({"section": "gpu", "params": numel, "tensors": len(params), "variant": name, "ms_p50": p50,
                     "ms_p20": p20, "ms_p80": p80, "tb_per_s": tbs, "pct_3.0TBs": 100 * tbs / 3.0,
                     "pct_3.35TBs": 100 * tbs / 3.35})
    rows += [{"section": "gpu", "params": numel, "variant": n, "error": e} for n, e in missing.items()]
    return rows


def print_rows(rows: list[dict]) -> None:
    cpu = [r for r in rows if r["section"] == "cpu"]
    if cpu:
        print("\nbest = fastest sample (least disturbed by other load); %copy = copy_ of the same bytes / step time")
        print(f"{'params':>8} {'variant':<20} {'ms best':>8} {'ms med':>8} {'Mparam/s':>9} {'GB/s':>6} "
              f"{'%copy best':>10} {'%copy med':>9} {'x fused (best)':>14}")
        for numel in sorted({r["params"] for r in cpu}):
            group = [r for r in cpu if r["params"] == numel]
            ref = next((r["ms_best"] for r in group if r["variant"] == "torch fused" and "error" not in r), None)
            for r in group:
                if "error" in r:
                    print(f"{numel:>8.0e} {r['variant']:<20} unavailable: {r['error']}")
                    continue
                speedup = f"{ref / r['ms_best']:.2f}" if ref else "-"
                print(f"{numel:>8.0e} {r['variant']:<20} {r['ms_best']:>8.2f} {r['ms_median']:>8.2f} "
                      f"{r['params_per_s_best'] / 1e6:>9.0f} {r['gb_per_s_best']:>6.1f} {r['pct_copy_best']:>10.1f} "
                      f"{r['pct_copy_median']:>9.1f} {speedup:>14}")
    gpu = [r for r in rows if r["section"] == "gpu"]
    if gpu:
        print(f"\n{'GPU params':>10} {'variant':<22} {'p50 ms':>8} {'p20':>8} {'p80':>8} {'TB/s':>6} {'%3.0':>6}")
        for r in gpu:
            if "error" in r:
                print(f"{r['params']:>10.2e} {r['variant']:<22} unavailable: {r['error']}")
            else:
                print(f"{r['params']:>10.2e} {r['variant']:<22} {r['ms_p50']:>8.3f} {r['ms_p20']:>8.3f} "
                      f"{r['ms_p80']:>8.3f} {r['tb_per_s']:>6.2f} {r['pct_3.0TBs']:>6.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also 1e8 params")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam (and its JIT build)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per size")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for every variant (0: keep)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_adam_<host>_<date>.json)")
    args = parser.parse_args(argv)
    sizes = [1_000_000, 10_000_000] + ([100_000_000] if args.large else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"bench_adam on {info['cpu']} ({info['cores']} cores, torch {info['torch']}, "
          f"deepspeed {info['deepspeed']}, isas {info['cpu_adam_isas']}, load {info['loadavg_at_start']})")
    rows = run_cpu(sizes, not args.no_deepspeed, args.rounds)
    if torch.cuda.is_available() and not args.no_gpu:
        rows += run_gpu(rounds=2)
    print_rows(rows)
    tag = f"_t{args.threads}" if args.threads else ""
    out = args.out or os.path.join(RESULTS, f"bench_adam_{platform.node() or 'host'}{tag}_{info['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": "bench_adam", "env": info, "hyper": HYPER, "rows": rows}, f, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
