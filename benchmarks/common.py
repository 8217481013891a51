"""Shared benchmark plumbing: argument parsing, timing, ceilings, the printed table and the JSON record.

Usage in a bench script::

    args = common.setup("bench_rms_norm", __doc__)   # exits cleanly without a GPU (unless --smoke)
    from megatrain.triton_kernels.rms_norm import rms_norm   # import kernels only after setup()
    cases = [common.Case(label, mode, {"triton": fn, "torch": ref, ...}, bytes_moved=..., flops=...)]
    common.run(args, cases)

On CUDA, each variant is timed with ``triton.testing.do_bench`` (p50/p20/p80 over ~100 ms), variants
interleaved and every case measured twice (the better p50 kept). ``--smoke`` runs tiny shapes on CPU
under Triton's interpreter with a wall-clock timer: it checks the plumbing, not the speed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

# Measured on this workplace's H100 (KERNELS.md) and the datasheet figures, for the "% of ceiling" columns.
CEILINGS = {
    "TB/s": {"measured": 3.0, "datasheet": 3.35},
    "TFLOP/s": {"measured": 798.0, "datasheet": 989.0},
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Case:
    """One shape: the variants to time (name -> zero-arg callable) and the work it does."""

    label: str
    mode: str  # "fwd", "bwd", "fwd+bwd", "step"
    variants: dict[str, Callable[[], object]]
    bytes_moved: float = 0.0  # compulsory bytes read + written once (memory-bound ops)
    flops: float = 0.0  # for compute-bound ops (attention)
    notes: dict = field(default_factory=dict)


def setup(name: str, description: str | None = None, argv=None) -> argparse.Namespace:
    """Parse the common flags; without CUDA (and without --smoke) print why and exit 0.

    Sets TRITON_INTERPRET=1 for --smoke, so call it before importing any kernel module."""
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1: checks the script, not the speed")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (the first of each list)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--out", default=None, help=f"JSON path (default: {RESULTS_DIR}/<name>_<gpu>_<date>.json)")
    args = parser.parse_args(argv)
    args.name = name
    import torch

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.device = "cpu"
        args.no_compile = True
    elif not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU (none found); nothing measured. "
              f"Run with --smoke for a CPU interpreter check of the script.")
        sys.exit(0)
    else:
        args.device = "cuda"
    return args


def time_ms(fn: Callable[[], object], *, smoke: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds."""
    if smoke:
        fn()  # warm-up (first call traces the kernel)
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        return statistics.median(samples), samples[0], samples[-1]
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return float(p50), float(p20), float(p80)


def env_info(device: str) -> dict:
    import torch
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none (interpreter smoke run)"
    return info


def _derived(case: Case, ms: float) -> tuple[str, float]:
    if case.flops:
        return "TFLOP/s", case.flops / (ms * 1e-3) / 1e12
    return "TB/s", case.bytes_moved / (ms * 1e-3) / 1e12


def measure(cases: list[Case], *, smoke: bool, rounds: int = 2) -> list[dict]:
    """Time every variant of every case, variants interleaved, ``rounds`` times; keep the best p50."""
    rows = []
    for case in cases:
        best: dict[str, tuple[float, float, float]] = {}
        errors: dict[str, str] = {}
        for _ in range(rounds):
            for name, fn in case.variants.items():
                if name in errors:
                    continue
                try:
                    result = time_ms(fn, smoke=smoke)
                except Exception as exc:  # a baseline that does not run here (e.g. a peer's API change)
                    errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                    continue
                if name not in best or result[0] < best[name][0]:
                    best[name] = result
        eager = best.get("torch", (None,))[0]
        compiled = best.get("torch.compile", (None,))[0]
        for name, (p50, p20, p80) in best.items():
            unit, value = _derived(case, p50)
            rows.append({
                "shape": case.label, "mode": case.mode, "variant": name,
                "ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "unit": unit, "value": value,
                "pct_measured_ceiling": 100 * value / CEILINGS[unit]["measured"],
                "pct_datasheet": 100 * value / CEILINGS[unit]["datasheet"],
                "x_vs_eager": eager / p50 if eager else None,
                "x_vs_compile": compiled / p50 if compiled else None,
                **case.notes,
            })
        for name, err in errors.items():
            rows.append({"shape": case.label, "mode": case.mode, "variant": name, "error": err})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'shape':<34} {'mode':<8} {'variant':<14} {'p50 ms':>9} {'p20':>8} {'p80':>8} {'rate':>14} " \
             f"{'%ceil':>6} {'x eager':>8} {'x compile':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<34} {r['mode']:<8} {r['variant']:<14} skipped: {r['error']}")
            continue
        fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        print(f"{r['shape']:<34} {r['mode']:<8} {r['variant']:<14} {r['ms_p50']:>9.4f} {r['ms_p20']:>8.4f} "
              f"{r['ms_p80']:>8.4f} {r['value']:>8.1f} {r['unit']:<5} {r['pct_measured_ceiling']:>6.1f} "
              f"{fmt(r['x_vs_eager']):>8} {fmt(r['x_vs_compile']):>9}")


def run_header(name: str, *, device: str, config: str, overrides) -> dict:
    """The fields every end-to-end benchmark record starts with (what ran, where, when)."""
    import platform

    import torch
    return {"benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": device, "config": config, "overrides": overrides}


def save_record(path: str, record: dict) -> str:
    """Write a JSON record atomically (temp + fsync + rename): an interrupted run never leaves half a result."""
    from megatrain.fsutil import atomic_write_text
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def write_json(args: argparse.Namespace, rows: list[dict]) -> str | None:
    """Write the record under benchmarks/results/ (GPU runs only, or where --out says)."""
    info = env_info(args.device)
    if args.out is None and args.smoke:
        return None  # smoke timings mean nothing; do not leave them beside real results
    if args.out:
        path = args.out
    else:
        gpu = info["gpu"].replace(" ", "_").replace("/", "_")
        path = os.path.join(RESULTS_DIR, f"{args.name}_{gpu}_{info['date'][:10]}.json")
    return save_record(path, {"benchmark": args.name, "env": info, "ceilings": CEILINGS, "rows": rows})


def run(args: argparse.Namespace, cases: list[Case]) -> list[dict]:
    rows = measure(cases, smoke=args.smoke)
    print(f"{args.name} on {env_info(args.device)['gpu']}"
          + (" (smoke: interpreter timings are meaningless)" if args.smoke else ""))
    print_table(rows)
    path = write_json(args, rows)
    if path:
        print(f"wrote {path}")
    return rows


def compiled(fn: Callable, args: argparse.Namespace) -> Callable | None:
    """torch.compile(fn), or None when disabled."""
    if args.no_compile:
        return None
    import torch

    return torch.compile(fn)


def optional(factory: Callable[[], Callable]) -> Callable | None:
    """A peer baseline (e.g. Liger) if it imports here, else None."""
    try:
        return factory()
    except Exception:
        return None


def variants(**fns: Callable | None) -> dict[str, Callable]:
    """Drop the baselines that are unavailable (None). Keyword names become column labels; use
    ``**{"torch.compile": f}`` for names that are not identifiers."""
    return {name: fn for name, fn in fns.items() if fn is not None}


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak extra CUDA memory of one call, in MiB (None on CPU)."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn()
    except Exception:  # the variant is reported as skipped by measure()
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def backward_of(forward: Callable[[], object], inputs: list) -> Callable[[], None]:
    """A zero-arg callable that runs only the backward of ``forward()``. The graph is built on the first
    call (so a failing variant is reported by ``measure``, not raised while building cases) and
    retained; gradients are reset each call so they do not accumulate."""
    import torch

    graph: dict = {}

    def run_backward():
        if not graph:
            out = forward()
            graph["outs"] = out if isinstance(out, (tuple, list)) else (out,)
            graph["grads"] = [torch.randn_like(o) for o in graph["outs"]]
        for x in inputs:
            x.grad = None
        torch.autograd.backward(graph["outs"], graph["grads"], retain_graph=True)

    return run_backward


def load_averages() -> str:
    """'1.02 0.97 0.88' (1, 5, 15 min): printed with CPU figures, since this machine is often shared."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def spread(samples: list[float]) -> dict:
    """{median, min, max, n} of a list of samples: what a CPU benchmark reports as `median [min, max]`."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def fmt_spread(s: dict, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}, {fmt.format(s['max'] * scale)}]"
