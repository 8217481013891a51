"""Start-up time of `make demo`'s training command: seconds from launching it to the first logged step.

Runs the demo's two commands (prepare, then a launcher with 2 CPU ranks: megatrain's local launcher, as
`make demo` does, torchrun, and DeepSpeed's runner, in turn) ``--rounds`` times in fresh run directories, and
for each records: prepare's wall time (a second prepare finds its cache), the time from starting the launcher to
the first row of metrics.jsonl (imports, rendezvous, JIT ops, model build, first step), and the whole run.
Round 1 may build DeepSpeed's JIT ops; later rounds show the warm start a second `make demo` gets. Load averages
are printed, since this machine is often shared.

    python benchmarks/bench_startup.py [--rounds 3] [--recipe recipes/tiny_cpu_gpt.yaml] [--ranks 2]
                                       [--launchers local,torchrun,deepspeed]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from megatrain.demo import train_command  # noqa: E402
from megatrain.distributed.local_launch import free_port, thread_env  # noqa: E402
from megatrain.testing import ROOT  # noqa: E402


def _first_row_after(proc: subprocess.Popen, metrics: str, start: float, timeout: float) -> float | None:
    """Seconds from ``start`` until ``metrics`` holds a complete line, or None if the run ended without one."""
    while time.perf_counter() - start < timeout:
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as f:
                if f.readline().endswith("\n"):
                    return time.perf_counter() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def _torchrun(recipe: str, ranks: int, extra: list[str]) -> tuple[list[str], dict]:
    return ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
             "127.0.0.1", "--master_port", str(free_port()), "launch/pretrain.py", "--config", recipe, *extra],
            thread_env(ranks))  # torchrun would export OMP_NUM_THREADS=1: give it the demo's thread count


def _deepspeed(recipe: str, ranks: int, extra: list[str]) -> tuple[list[str], dict]:
    return ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
             str(free_port()), "launch/pretrain.py", "--config", recipe, *extra], {})


# (argv, extra env) of each launch; "local" is make demo's own (megatrain.distributed.local_launch)
LAUNCHERS = {"local": train_command, "torchrun": _torchrun, "deepspeed": _deepspeed}


def one_round(recipe: str, ranks: int, steps: int, run_dir: str, launcher: str = "deepspeed") -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    extra = [f"--log.dir={run_dir}", f"--train.max_steps={steps}", "--log.progress=none", "--log.report=false",
             "--checkpoint.save_final=false", "--train.eval_every=0", "--train.eval_batches=1"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "launch/prepare.py", "--config", recipe, *extra], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    prepare_s = time.perf_counter() - t0
    cmd, launch_env = LAUNCHERS[launcher](recipe, ranks, extra)
    env = {**env, **launch_env}
    start = time.perf_counter()
    with open(os.path.join(run_dir, "launcher.log"), "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        first = _first_row_after(proc, os.path.join(run_dir, "metrics.jsonl"), start, timeout=600)
        rc = proc.wait(timeout=900)
    total = time.perf_counter() - start
    if rc != 0 or first is None:
        raise SystemExit(f"bench_startup: the run failed (exit {rc}); see {run_dir}/launcher.log")
    return {"prepare_s": prepare_s, "first_step_s": first, "run_s": total}


def import_seconds(module: str) -> float:
    """Wall seconds of a fresh ``python -c "import <module>"``: the floor every launcher and rank pays, so rounds
    taken on a slower (shared) machine can be read against it."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny_cpu_gpt.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--launchers", default="local,torchrun,deepspeed",
                        help="comma-separated, from: " + ", ".join(LAUNCHERS) + " (they alternate every round)")
    parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "bench_startup.json"))
    args = parser.parse_args(argv)
    launchers = args.launchers.split(",")
    unknown = [x for x in launchers if x not in LAUNCHERS]
    if unknown:
        raise SystemExit(f"bench_startup: --launchers {','.join(unknown)} is not one of {', '.join(LAUNCHERS)}")
    rounds = {x: [] for x in launchers}
    floor = {"torch": [], "deepspeed": []}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for i in range(args.rounds):
            for module in floor:
                floor[module].append(import_seconds(module))
            for launcher in launchers[i % len(launchers):] + launchers[:i % len(launchers)]:
                run_dir = os.path.join(tmp, f"{launcher}{i}")
                os.makedirs(run_dir)
                load = common.load_averages()
                r = one_round(args.recipe, args.ranks, args.steps, run_dir, launcher)
                r["load_averages"] = load
                rounds[launcher].append(r)
                print(f"round {i + 1} {launcher:9s}: prepare {r['prepare_s']:6.2f} s   launch -> first step "
                      f"{r['first_step_s']:6.2f} s   whole run {r['run_s']:6.2f} s   (load {load})", flush=True)
    floor_s = {m: common.spread(v) for m, v in floor.items()}
    print(f"\nimport floor: torch {floor_s['torch']['median']:.2f} s, deepspeed {floor_s['deepspeed']['median']:.2f} s "
          f"(median of {args.rounds} fresh interpreters)")
    warm = {}
    for launcher, rs in rounds.items():
        w = [r["first_step_s"] for r in rs[1:]] or [rs[0]["first_step_s"]]
        warm[launcher] = common.spread(w)
        print(f"warm start, {launcher:9s} (rounds 2..): launch -> first step median {warm[launcher]['median']:.2f} s "
              f"[{min(w):.2f}, {max(w):.2f}]")
    import torch
    record = {"benchmark": "bench_startup", "recipe": args.recipe, "ranks": args.ranks, "steps": args.steps,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "rounds": rounds, "import_floor_s": floor_s,
              "warm_first_step_s": warm, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print("wrote", common.save_record(args.out, record))


if __name__ == "__main__":
    main()
