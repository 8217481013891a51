"""`make demo`'s launch: torchrun with megatrain's per-rank thread rule, from a parent that never imports torch."""
import os
import subprocess
import sys

from megatrain.demo import train_command
from megatrain.distributed.threads import rank_thread_count
from megatrain.testing import ROOT


def test_torchrun_with_cores_over_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv, env = train_command("recipes/tiny_cpu_gpt.yaml", 2, ["--train.max_steps=3"], port=29999)
    assert argv[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert argv[-3:] == ["--config", "recipes/tiny_cpu_gpt.yaml", "--train.max_steps=3"] and "29999" in argv
    cores = len(os.sched_getaffinity(0))
    assert env == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert env["OMP_NUM_THREADS"] == str(rank_thread_count({"LOCAL_WORLD_SIZE": "2"}, cores)[0])


def test_the_users_thread_count_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train_command("recipes/tiny_cpu_gpt.yaml", 2, [])[1] == {}


def test_the_demo_parent_does_not_import_torch():
    # every second the parent spends importing torch is added to the demo's start-up before a rank starts
    code = "import sys, megatrain.demo; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout.split()
    assert out == ["False", "False"]


def test_bench_startup_names_an_unknown_launcher():
    import pytest
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_startup
    with pytest.raises(SystemExit, match="--launchers mpirun is not one of torchrun, deepspeed"):
        bench_startup.main(["--launchers", "torchrun,mpirun", "--rounds", "1"])
