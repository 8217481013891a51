"""`make demo`'s launch: megatrain's local launcher (per-rank thread rule), from a parent that never imports torch."""
import os
import subprocess
import sys

from megatrain.demo import train_command
from megatrain.testing import ROOT


def test_the_demo_starts_its_ranks_with_the_local_launcher():
    argv, env = train_command("recipes/tiny_cpu_gpt.yaml", 2, ["--train.max_steps=3"], port=29999)
    assert argv[1:7] == ["-m", "megatrain.distributed.local_launch", "--nproc", "2", "--port", "29999"]
    assert argv[-4:] == ["launch/pretrain.py", "--config", "recipes/tiny_cpu_gpt.yaml", "--train.max_steps=3"]
    assert env == {}  # the launcher applies the thread rule itself (tests/unit/test_local_launch.py)


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
    with pytest.raises(SystemExit, match="--launchers mpirun is not one of local, torchrun, deepspeed"):
        bench_startup.main(["--launchers", "torchrun,mpirun", "--rounds", "1"])
