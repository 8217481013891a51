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

# Datasheet memory bandwidth (TB/s) by CUDA device name, first match wins; the bf16 dense peak is
# megatrain/train/perf.py's table. The "measured" ceilings are measured on the device at benchmark time
# (``measure_ceilings``): a device-to-device copy and a large bf16 GEMM, so "% of ceiling" never rests on
# another machine's figure.
DATASHEET_TBPS = (("H100 PCIE", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("H800", 3.35),
                  ("GH200", 4.0), ("B200", 8.0), ("A100", 2.039), ("L40S", 0.864), ("L40", 0.864), ("L4", 0.3),
                  ("A10G", 0.6), ("A10", 0.6), ("RTX 4090", 1.008))
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


def datasheet_ceilings(gpu_name: str) -> dict:
    from megatrain.train.perf import peak_bf16_flops
    upper = gpu_name.upper()
    tbps = next((v for k, v in DATASHEET_TBPS if k in upper), None)
    flops = peak_bf16_flops(gpu_name)
    return {"TB/s": tbps, "TFLOP/s": flops / 1e12 if flops else None}


def measure_ceilings(device: str, *, copy_bytes: int = 2 << 30, gemm_n: int = 8192) -> dict:
    """{"TB/s": {"measured", "datasheet"}, "TFLOP/s": {...}} for this device, measured now.

    Copy: ``dst.copy_(src)`` of ``copy_bytes`` (2 GiB, ≫ L2), counted as read + write. GEMM: bf16
    (n×n)·(n×n), 2n³ FLOPs. Both the p50 of do_bench. Without CUDA nothing is measured (None)."""
    if device != "cuda":
        return {"TB/s": {"measured": None, "datasheet": None}, "TFLOP/s": {"measured": None, "datasheet": None},
                "how": "not measured (no GPU)"}
    import torch
    from triton.testing import do_bench

    sheet = datasheet_ceilings(torch.cuda.get_device_name())
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    copy_ms = copy_ms[0] if isinstance(copy_ms, (list, tuple)) else copy_ms
    del src, dst
    a = torch.randn(gemm_n, gemm_n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(gemm_n, gemm_n, dtype=torch.bfloat16, device="cuda")
    gemm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, quantiles=[0.5])
    gemm_ms = gemm_ms[0] if isinstance(gemm_ms, (list, tuple)) else gemm_ms
    del a, b
    torch.cuda.empty_cache()
    return {"TB/s": {"measured": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12, "datasheet": sheet["TB/s"]},
            "TFLOP/s": {"measured": 2 * gemm_n**3 / (gemm_ms * 1e-3) / 1e12, "datasheet": sheet["TFLOP/s"]},
            "how": f"copy of {copy_bytes / 2**30:.0f} GiB (read+write), bf16 GEMM {gemm_n}^3, do_bench p50"}


_CEILINGS: dict = {}


def ceilings(device: str) -> dict:
    """The device's ceilings, measured once per process."""
    if device not in _CEILINGS:
        _CEILINGS[device] = measure_ceilings(device)
    return _CEILINGS[device]


def _pct(value: float, ceiling: float | None) -> float | None:
    return 100 * value / ceiling if ceiling else None


def _derived(case: Case, ms: float) -> tuple[str, float]:
    if case.flops:
        return "TFLOP/s", case.flops / (ms * 1e-3) / 1e12
    return "TB/s", case.bytes_moved / (ms * 1e-3) / 1e12


def measure(cases: list[Case], *, smoke: bool, rounds: int = 2, ceiling: dict | None = None) -> list[dict]:
    """Time every variant of every case, variants interleaved, ``rounds`` times; keep the best p50.
    ``ceiling``: ``measure_ceilings``' result for the "% of measured / datasheet" columns."""
    ceiling = ceiling or ceilings("cpu" if smoke else "cuda")
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
                "pct_measured_ceiling": _pct(value, ceiling[unit]["measured"]),
                "pct_datasheet": _pct(value, ceiling[unit]["datasheet"]),
                "x_vs_eager": eager / p50 if eager else None,
                "x_vs_compile": compiled / p50 if compiled else None,
                **case.notes,
            })
        for name, err in errors.items():
            rows.append({"shape": case.label, "mode": case.mode, "variant": name, "error": err})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'shape':<34} {'mode':<8} {'variant':<14} {'p50 ms':>9} {'p20':>8} {'p80':>8} {'rate':>14} " \
             f"{'%meas':>6} {'%sheet':>6} {'x eager':>8} {'x compile':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<34} {r['mode']:<8} {r['variant']:<14} skipped: {r['error']}")
            continue
        fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        fmt1 = lambda x: f"{x:.1f}" if x is not None else "-"  # noqa: E731
        print(f"{r['shape']:<34} {r['mode']:<8} {r['variant']:<14} {r['ms_p50']:>9.4f} {r['ms_p20']:>8.4f} "
              f"{r['ms_p80']:>8.4f} {r['value']:>8.1f} {r['unit']:<5} {fmt1(r['pct_measured_ceiling']):>6} "
              f"{fmt1(r['pct_datasheet']):>6} {fmt(r['x_vs_eager']):>8} {fmt(r['x_vs_compile']):>9}")


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
    return save_record(path, {"benchmark": args.name, "env": info, "ceilings": ceilings(args.device), "rows": rows})


def kernel_records(rows: list[dict]) -> list[dict]:
    """Policy records (ops/policy.py) from benchmark rows: per case and mode with a ``policy`` note, the
    triton variant's p50 against the torch path's (eager torch: what ``auto`` runs otherwise)."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "policy" in r and "error" not in r:
            by_case.setdefault((r["shape"], r["mode"]), {})[r["variant"]] = r
    out = []
    for (label, mode), variants_ in by_case.items():
        if "triton" in variants_ and "torch" in variants_:
            pol = variants_["triton"]["policy"]
            out.append({"op": pol["op"], "backend": "triton", "dtype": pol["dtype"], "shape": pol["shape"],
                        "mode": mode, "label": label, "ms": variants_["triton"]["ms_p50"],
                        "torch_ms": variants_["torch"]["ms_p50"]})
    return out


def write_kernel_records(records: list[dict], info: dict, directory: str = RESULTS_DIR) -> str | None:
    """Merge ``records`` into ``kernels_<gpu class>.json`` (an op's old records are replaced by its new ones)."""
    if not records or info.get("device") != "cuda":
        return None
    from megatrain.ops.policy import gpu_class
    cls = gpu_class(info["gpu"])
    path = os.path.join(directory, f"kernels_{cls}.json")
    old = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("records", [])
    ops = {r["op"] for r in records}
    merged = [r for r in old if r["op"] not in ops] + records
    return save_record(path, {"gpu": info["gpu"], "gpu_class": cls, "torch": info["torch"], "triton": info["triton"],
                              "date": info["date"], "records": merged})


def run(args: argparse.Namespace, cases: list[Case]) -> list[dict]:
    ceiling = ceilings(args.device)
    rows = measure(cases, smoke=args.smoke, ceiling=ceiling)
    print(f"{args.name} on {env_info(args.device)['gpu']}"
          + (" (smoke: interpreter timings are meaningless)" if args.smoke else ""))
    if ceiling["TB/s"]["measured"]:
        print(f"ceilings measured now: {ceiling['TB/s']['measured']:.2f} TB/s copy, "
              f"{ceiling['TFLOP/s']['measured']:.0f} TFLOP/s bf16 GEMM (datasheet {ceiling['TB/s']['datasheet']} TB/s, "
              f"{ceiling['TFLOP/s']['datasheet']} TFLOP/s); %meas / %sheet columns are of these")
    print_table(rows)
    path = write_json(args, rows)
    if path:
        print(f"wrote {path}")
        records = write_kernel_records(kernel_records(rows), env_info(args.device))
        if records:
            print(f"kernel choice records (model.kernels=auto reads them): {records}")
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


def alternate(fns: dict, n: int) -> dict[str, list[float]]:
    """Seconds per step of each loop, one step of each in turn, the starting loop rotated every round."""
    names, times = list(fns), {k: [] for k in fns}
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def trainer_optimizer(cfg, model):
    """(AdamW, LR schedule) as the megatrain Trainer builds them, for a baseline loop over ``model``."""
    import torch

    from megatrain.ops import make_adamw
    from megatrain.train.regularization import param_groups
    from megatrain.train.schedules import lr_multiplier
    t = cfg.train
    opt = make_adamw(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                     weight_decay=t.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(t))


def hand_loop(cfg, model, dataset, sampler, *, micro: int, device="cpu", logits=lambda out: out):
    """The loop a user would write by hand, as one step function: forward, CE, backward over ``micro`` micro
    batches, clip, AdamW, scheduler. Batches are ``sampler``'s over ``dataset`` (the Trainer's own); the optimizer is
    the one the Trainer builds (torch's per-tensor AdamW flattered megatrain by 2-5%). ``logits`` reads them from
    the model's output (HF models return an object). A DDP model all-reduces once per step (``no_sync`` before),
    as DeepSpeed does at the accumulation boundary. Returns tokens per step."""
    import contextlib

    import torch
    import torch.nn.functional as F

    t = cfg.train
    opt, sched = trainer_optimizer(cfg, model)
    state = {"step": 0}

    def step() -> int:
        idx = sampler.indices_for_step(state["step"])
        for m in range(micro):
            items = [dataset[i] for i in idx[m * t.micro_batch_size:(m + 1) * t.micro_batch_size]]
            x = torch.stack([it["input_ids"] for it in items]).to(device)  # (B, T)
            y = torch.stack([it["labels"] for it in items]).to(device)  # (B, T)
            sync = m == micro - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                out = logits(model(x))  # (B, T, V)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)) / micro
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        state["step"] += 1
        return micro * t.micro_batch_size * x.shape[1]

    return step
