"""The prepared GPU check's plan runs on CPU in seconds, and the kernel benchmarks' records round-trip into
the kernel choice (benchmark rows → kernels_<class>.json → KernelPolicy)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_dry_run_lists_every_step_within_budget(tmp_path):
    out = tmp_path / "plan.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    plan = json.loads(out.read_text())
    steps = plan["steps"]
    assert {"env", "ceilings", "extensions", "gpu_tests", "train", "bench_attention", "bench_cross_entropy"} <= set(steps)
    assert all(s["status"] == "planned" and s["ok"] for s in steps.values()), steps
    assert plan["budget_s"] <= 8 * 60  # the check must fit 8 minutes on one H100/H200
    assert "train" in p.stdout and "bench_rms_norm" in p.stdout


def test_bad_arguments_are_one_line_exit_2(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    for argv, words in ((["--only", "nope"], "unknown steps"), (["--wheels", str(tmp_path / "missing")], "--wheels")):
        p = subprocess.run([sys.executable, script, "--dry-run", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_benchmark_rows_become_kernel_choice_records(tmp_path):
    import common

    from megatrain.ops.policy import KernelPolicy

    pol = {"op": "rms_norm", "dtype": "bfloat16", "shape": {"hidden": 4096, "tokens": 16384}}
    rows = [{"shape": "16384x4096 bfloat16", "mode": m, "variant": v, "ms_p50": ms, "policy": pol}
            for m, v, ms in (("fwd", "triton", 0.08), ("fwd", "torch", 0.10), ("fwd", "liger", 0.07),
                             ("bwd", "triton", 0.20), ("bwd", "torch", 0.30))]
    records = common.kernel_records(rows)
    assert [(r["mode"], r["ms"], r["torch_ms"]) for r in records] == [("fwd", 0.08, 0.10), ("bwd", 0.20, 0.30)]
    info = {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "2026-12-02"}
    path = common.write_kernel_records(records, info, directory=str(tmp_path))
    assert os.path.basename(path) == "kernels_H200.json"
    choice = KernelPolicy(gpu="NVIDIA H200", directory=str(tmp_path)).resolve_auto(
        "rms_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 4096})
    assert choice.backend == "triton" and "kernels_H200.json" in choice.reason
    # a later run of the same op replaces its records (here: slower in bwd) and the choice follows
    rows[4]["ms_p50"] = 0.15
    common.write_kernel_records(common.kernel_records(rows), info, directory=str(tmp_path))
    doc = json.loads((tmp_path / "kernels_H200.json").read_text())
    assert len(doc["records"]) == 2
    choice = KernelPolicy(gpu="NVIDIA H200", directory=str(tmp_path)).resolve_auto(
        "rms_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 4096})
    assert choice.backend == "torch"
    assert common.write_kernel_records(records, {**info, "device": "cpu"}, directory=str(tmp_path)) is None


@pytest.mark.slow
def test_training_step_of_the_check_runs_through_the_trainer(tmp_path):
    """The check's training run (random tokens, the Trainer, mfu/memory fields) with a toy model on CPU."""
    out = tmp_path / "train.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--_train", "torch",
                        "--_train-out", str(out), "--_tiny", "--_steps", "3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["path"] == "Trainer (DeepSpeed)" and len(rec["losses"]) == 3
    assert rec["tokens_per_s"] > 0 and rec["peak_mem_gib"] > 0 and "mfu" not in rec  # CPU: no datasheet peak
