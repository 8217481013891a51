"""One prepared GPU check: everything megatrain can only prove on a GPU, in one command, ≤ 8 minutes on one
H100/H200, one JSON record and one table.

    python benchmarks/gpu_check.py [--wheels DIR] [--out PATH] [--only STEP,...]   # make gpu-check
    python benchmarks/gpu_check.py --dry-run                                       # the plan, on CPU, seconds

Steps (each a subprocess with its own time limit, so one failure or hang never loses the others):
  env         python/torch/triton versions, GPU name; installs the wheels of --wheels DIR (DeepSpeed and the
              packages it needs, e.g. pydantic; Liger) when DeepSpeed is not importable
  ceilings    device-to-device copy bandwidth and bf16 GEMM, measured now (benchmarks/common.py)
  extensions  the CUDA C++ extension build (JIT, csrc/) and load
  gpu_tests   every @pytest.mark.gpu test
  train       a 1-GPU bf16 run of a gpt2_124m-shaped model on random tokens, ~30 steps, with
              model.kernels=torch and =triton: tokens/s, MFU, peak memory, first-10-step loss difference
  bench_*     each kernel benchmark (--quick) against SDPA/torch (and Liger when its wheel is given); the
              kernel-choice records they write (benchmarks/results/kernels_<gpu class>.json) are what
              model.kernels=auto reads

The record: benchmarks/results/gpu_check_<gpu>_<date>.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

BENCHES = ("attention", "rms_norm", "layer_norm", "cross_entropy", "swiglu", "rope", "adamw_triton")
# name -> (seconds allowed, what it proves); the sum stays under 8 minutes with the machine's start excluded
BENCH_LIMIT_S = {"attention": 35, "cross_entropy": 20}
STEPS = {
    "env": (30, "versions, GPU, DeepSpeed installed from --wheels if absent"),
    "ceilings": (15, "copy TB/s and bf16 GEMM TFLOP/s measured on this device"),
    "extensions": (70, "CUDA C++ extensions build and load"),
    "gpu_tests": (100, "every @pytest.mark.gpu test"),
    "train": (130, "gpt2_124m-shaped bf16 run, kernels=torch vs triton"),
    **{f"bench_{b}": (BENCH_LIMIT_S.get(b, 15), f"benchmarks/bench_{b}.py --quick") for b in BENCHES},
}  # 475 s in all
TRAIN_STEPS = 30


def _tail(text: str, n: int = 2500) -> str:
    return text[-n:] if text else ""


def _run(cmd: list[str], timeout: float, env: dict | None = None, *, full_stdout: bool = False) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return {"rc": p.returncode, "s": time.monotonic() - t0, "stdout": p.stdout if full_stdout else _tail(p.stdout),
                "stderr": _tail(p.stderr)}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"rc": 124, "s": time.monotonic() - t0, "stdout": _tail(out), "stderr": f"timed out after {timeout}s"}


# ---- steps -------------------------------------------------------------------------------------------

def step_env(args, site: str) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not _importable("deepspeed") and args.wheels:
        wheels = sorted(os.path.join(args.wheels, f) for f in os.listdir(args.wheels) if f.endswith(".whl"))
        r = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--no-cache-dir", "--upgrade", "--target", site, *wheels], timeout=STEPS["env"][0] - 10)
        info["wheels_installed"] = [os.path.basename(w) for w in wheels] if r["rc"] == 0 else []
        if r["rc"]:
            info["pip_error"] = r["stderr"]
    info["deepspeed"] = _version("deepspeed")
    info["liger_kernel"] = _version("liger_kernel")
    return {"ok": info["gpu"] is not None, **info}


def _importable(mod: str) -> bool:
    return _run([sys.executable, "-c", f"import {mod}"], timeout=60)["rc"] == 0


def _version(mod: str) -> str | None:
    r = _run([sys.executable, "-c", f"import {mod} as m; print(getattr(m, '__version__', 'installed'))"], timeout=60)
    return r["stdout"].strip().splitlines()[-1] if r["rc"] == 0 and r["stdout"].strip() else None


def step_ceilings(args) -> dict:
    import common
    c = common.measure_ceilings("cuda")
    return {"ok": c["TB/s"]["measured"] is not None, **c}


def step_extensions(args) -> dict:
    r = _run([sys.executable, "-m", "megatrain.ops.extensions", "--build", "--json"], timeout=STEPS["extensions"][0],
             full_stdout=True)
    try:  # build logs may precede the JSON
        report = json.loads(r["stdout"][r["stdout"].index("{"):])
        exts = {e["name"]: {"state": e["state"], "detail": e.get("detail")} for e in report["extensions"]}
    except (ValueError, KeyError):
        return {"ok": False, **r, "stdout": _tail(r["stdout"])}
    return {"ok": r["rc"] == 0 and all(e["state"] == "loaded" for e in exts.values()), "extensions": exts,
            **({} if r["rc"] == 0 else r)}


def step_gpu_tests(args) -> dict:
    xml = os.path.join(args.work, "gpu_tests.xml")
    r = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
              f"--junitxml={xml}"], timeout=STEPS["gpu_tests"][0])
    counts = {}
    if os.path.isfile(xml):
        import xml.etree.ElementTree as ET
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"ok": r["rc"] == 0, **counts, **r}


def step_train(args) -> dict:
    runs = {}
    for kernels in ("torch", "triton"):
        out = os.path.join(args.work, f"train_{kernels}.json")
        r = _run([sys.executable, os.path.abspath(__file__), "--_train", kernels, "--_train-out", out],
                 timeout=STEPS["train"][0] / 2)
        runs[kernels] = json.load(open(out)) if os.path.isfile(out) else {"error": r["stderr"] or r["stdout"]}
        runs[kernels]["rc"] = r["rc"]
    res = {"ok": all(v.get("rc") == 0 for v in runs.values()), "runs": runs}
    a, b = runs["torch"].get("losses"), runs["triton"].get("losses")
    if a and b:
        res["first10_max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a[:10], b[:10]))
    return res


def step_bench(args, name: str) -> dict:
    out = os.path.join(args.work, f"bench_{name}.json")
    r = _run([sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--quick", "--no-compile", "--out", out],
             timeout=STEPS[f"bench_{name}"][0])
    rows = json.load(open(out))["rows"] if os.path.isfile(out) else []
    return {"ok": r["rc"] == 0 and bool(rows), "rows": rows, **({} if r["rc"] == 0 else r)}


# ---- the training run (a subprocess of step_train) ------------------------------------------------------

# --_tiny: the same run with a toy model on CPU, so the test suite checks this path end to end
TINY = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.vocab_size": 128,
        "model.max_seq_len": 16, "data.seq_len": 16, "train.precision": "fp32", "train.global_batch_size": 2,
        "train.micro_batch_size": 2}


def train_config(kernels: str, work: str, *, steps: int = TRAIN_STEPS, tiny: bool = False):
    from megatrain.config import load_config
    return load_config(os.path.join(ROOT, "recipes", "gpt2_124m.yaml"), {
        "model.kernels": kernels, "train.max_steps": steps, "train.global_batch_size": 8,
        "train.micro_batch_size": 8, "train.warmup_steps": 2, "train.eval_every": 0, "checkpoint.every": 0,
        "checkpoint.save_final": False, "log.dir": os.path.join(work, f"run_{kernels}"),
        "log.progress": "none", "log.report": False, "data.path": "random", **(TINY if tiny else {})})


def dry_check(name: str, args) -> dict:
    """What can be checked without a GPU, in well under a second per step: the inputs each step needs."""
    if name == "train":
        for kernels in ("torch", "triton"):
            train_config(kernels, args.work)  # the run's config must validate before GPU time is spent on it
        return {"ok": True, "checked": "config of both runs validates"}
    if name.startswith("bench_"):
        path = os.path.join(HERE, f"{name}.py")
        import py_compile
        py_compile.compile(path, doraise=True, cfile=os.path.join(args.work, f"{name}.pyc"))
        return {"ok": True, "checked": f"{os.path.relpath(path, ROOT)} compiles"}
    if name == "gpu_tests":
        return {"ok": os.path.isdir(os.path.join(ROOT, "tests")), "checked": "tests/ present"}
    return {"ok": True, "checked": "nothing to check on CPU"}


def train_once(kernels: str, out: str, *, steps: int = TRAIN_STEPS, tiny: bool = False) -> None:
    """gpt2_124m's shapes (vocab 50304, 12×768, T=1024) on random tokens, bf16, one GPU. Through the real
    Trainer (DeepSpeed) when DeepSpeed imports; a plain torch loop with the same model and AdamW otherwise."""
    import torch
    from torch.utils.data import Dataset

    from megatrain.train.lm_task import LanguageModelingTask

    cfg = train_config(kernels, os.path.dirname(out), steps=steps, tiny=tiny)

    class RandomTokens(Dataset):
        def __init__(self, n, seq, vocab):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, vocab, (n, seq + 1), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}

    class RandomLM(LanguageModelingTask):
        def train_dataset(self):
            return RandomTokens(steps * cfg.train.global_batch_size, cfg.seq_len, min(50257, cfg.model.vocab_size))

        def val_dataset(self):
            return None

    record = {"kernels": kernels, "steps": steps, "tokens_per_step": cfg.train.global_batch_size * cfg.seq_len}
    try:
        import deepspeed  # noqa: F401
        record["path"] = "Trainer (DeepSpeed)"
        losses, times, perf = _train_with_trainer(cfg, RandomLM(cfg))
    except ImportError:
        record["path"] = "plain torch loop (no DeepSpeed here)"
        losses, times, perf = _train_plain(cfg, RandomLM(cfg), steps)
    steady = sorted(times[5:]) or times
    tps = record["tokens_per_step"] / steady[len(steady) // 2]
    record.update(losses=losses, step_time_s_median=steady[len(steady) // 2], tokens_per_s=tps,
                  **perf.fields(tps))
    with open(out, "w") as f:
        json.dump(record, f)


def _train_with_trainer(cfg, task):
    from megatrain.train.trainer import Trainer
    trainer = Trainer(cfg, task)
    trainer.run()
    rows = [json.loads(line) for line in open(os.path.join(cfg.log.dir, "metrics.jsonl"))]
    from megatrain.train.perf import StepPerf
    return [r["loss"] for r in rows], [r["step_time_s"] for r in rows], StepPerf(cfg, trainer.device, 1)


def _train_plain(cfg, task, steps):
    import torch

    from megatrain import ops
    from megatrain.models.transformer import build_transformer
    from megatrain.train.perf import StepPerf

    ops.configure(cfg.model.kernels, cfg.model.kernel_overrides)
    model = build_transformer(cfg.model, seed=cfg.train.seed).cuda().to(torch.bfloat16)
    opt = ops.make_adamw(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, eps=cfg.train.eps,
                         weight_decay=cfg.train.weight_decay)
    data = task.train_dataset()
    losses, times = [], []
    b = cfg.train.micro_batch_size
    for step in range(steps):
        batch = {k: torch.stack([data[step * b + i][k] for i in range(b)]).cuda() for k in ("input_ids", "labels")}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = task.loss_and_stats(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return losses, times, StepPerf(cfg, torch.device("cuda"), 1)


# ---- driver ------------------------------------------------------------------------------------------

def print_table(record: dict) -> None:
    print(f"gpu_check on {record.get('gpu')} ({record['date']}), {record['total_s']:.0f}s")
    print(f"{'step':<22} {'ok':<4} {'s':>6}  detail")
    for name, r in record["steps"].items():
        detail = ""
        if name == "ceilings" and r.get("TB/s"):
            detail = (f"{r['TB/s']['measured']:.2f} TB/s copy (sheet {r['TB/s']['datasheet']}), "
                      f"{r['TFLOP/s']['measured']:.0f} TFLOP/s bf16 (sheet {r['TFLOP/s']['datasheet']})")
        elif name == "extensions" and "extensions" in r:
            detail = ", ".join(f"{k} {v['state']}" for k, v in r["extensions"].items())
        elif name == "gpu_tests" and "tests" in r:
            detail = f"{r['tests']} tests, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
        elif name == "train" and "runs" in r:
            parts = []
            for k, v in r["runs"].items():
                if "tokens_per_s" in v:
                    mfu = f" mfu {100 * v['mfu']:.1f}%" if "mfu" in v else ""
                    parts.append(f"{k}: {v['tokens_per_s']:.0f} tok/s{mfu} {v['peak_mem_gib']:.1f} GiB")
                else:
                    parts.append(f"{k}: failed")
            if "first10_max_abs_loss_diff" in r:
                parts.append(f"|Δloss| first 10 ≤ {r['first10_max_abs_loss_diff']:.4f}")
            detail = "; ".join(parts)
        elif name.startswith("bench_") and r.get("rows"):
            speed = [x for x in r["rows"] if x.get("variant") == "triton" and x.get("x_vs_eager")]
            detail = ", ".join(f"{x['shape']} {x['mode']} {x['x_vs_eager']:.2f}× torch" for x in speed[:3])
        elif r.get("status") == "planned":
            detail = f"{STEPS[name][1]} (limit {STEPS[name][0]}s; {r.get('checked') or r.get('error')})"
        elif not r.get("ok"):
            detail = (r.get("stderr") or r.get("error") or "").strip().splitlines()[-1:] or [""]
            detail = detail[0][:100]
        print(f"{name:<22} {'yes' if r.get('ok') else 'no' if 'ok' in r else '-':<4} {r.get('s', 0):>6.1f}  {detail}")


def _link_kernels() -> None:
    """A bare checkout has no megatrain/triton_kernels (setup.py maps kernels/ there at install; the
    development symlink is git-ignored): make the link so the kernels import without installing."""
    link = os.path.join(ROOT, "megatrain", "triton_kernels")
    if not os.path.exists(link):
        os.symlink(os.path.join("..", "kernels"), link)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list the steps and write the plan; runs on CPU")
    p.add_argument("--wheels", help="directory of wheels (deepspeed and its needs, liger-kernel) to install "
                                    "when DeepSpeed is absent")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu_check_<gpu>_<date>.json)")
    p.add_argument("--only", help="comma-separated subset of steps")
    p.add_argument("--_train", help=argparse.SUPPRESS)
    p.add_argument("--_train-out", help=argparse.SUPPRESS)
    p.add_argument("--_tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_steps", type=int, default=TRAIN_STEPS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._train:
        train_once(args._train, args._train_out, steps=args._steps, tiny=args._tiny)
        return 0
    names = list(STEPS)
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in STEPS]
        if unknown:
            print(f"gpu_check: --only has unknown steps {unknown}; steps: {', '.join(STEPS)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only.split(",")]
    if args.wheels and not os.path.isdir(args.wheels):
        print(f"gpu_check: --wheels {args.wheels} is not a directory; pass the folder holding the .whl files",
              file=sys.stderr)
        return 2
    _link_kernels()
    import torch
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    record = {"benchmark": "gpu_check", "date": date, "gpu": gpu, "dry_run": args.dry_run,
              "budget_s": sum(STEPS[n][0] for n in names), "steps": {}}
    if not args.dry_run and gpu is None:
        print("gpu_check: needs a CUDA GPU (none found); use --dry-run to see the plan", file=sys.stderr)
        return 2
    args.work = os.path.join(ROOT, "runs", "gpu_check")
    os.makedirs(args.work, exist_ok=True)
    site = os.path.join(args.work, "site")
    # the checkout (and the installed wheels) must be importable by every subprocess: bench scripts run as files
    os.environ["PYTHONPATH"] = os.pathsep.join(([site] if args.wheels else []) + [ROOT, os.environ.get("PYTHONPATH", "")])
    if args.wheels:
        sys.path.insert(0, site)
    t_all = time.monotonic()
    for name in names:
        if args.dry_run:
            try:
                check = dry_check(name, args)
            except Exception as exc:  # a step that would fail on the GPU for a reason visible here
                check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            record["steps"][name] = {"status": "planned", "limit_s": STEPS[name][0], "what": STEPS[name][1], **check}
            continue
        t0 = time.monotonic()
        try:
            if name == "env":
                r = step_env(args, site)
            elif name.startswith("bench_"):
                r = step_bench(args, name.removeprefix("bench_"))
            else:
                r = globals()[f"step_{name}"](args)
        except Exception as exc:  # a broken step is a result, not the end of the check
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        r["s"] = time.monotonic() - t0
        record["steps"][name] = r
        print(f"[gpu_check] {name}: {'ok' if r.get('ok') else 'FAILED'} in {r['s']:.0f}s", flush=True)
    record["total_s"] = time.monotonic() - t_all
    import common
    if args.out:
        path = args.out
    elif args.dry_run:
        path = os.path.join(args.work, "gpu_check_dry_run.json")
    else:
        path = os.path.join(common.RESULTS_DIR, f"gpu_check_{gpu.replace(' ', '_')}_{date[:10]}.json")
    common.save_record(path, record)
    print_table(record)
    print(f"wrote {path}")
    return 0 if all(r.get("ok") for r in record["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
