"""The launch matrix on one machine: deepspeed with a `localhost slots=2` hostfile and --no_ssh, torchrun as two
local "nodes" (--nnodes 2 --node_rank 0/1), and a rank killed with SIGKILL stopping each launcher non-zero
within seconds."""
import json
import os
import subprocess
import sys
import time

import pytest

from megatrain.testing import ROOT, free_port
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

KILL_RANK1 = '''
import os, runpy, signal, sys
from megatrain.train.trainer import Trainer
step = Trainer.train_step
def dying(self):
    if self.rank == 1 and self.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self)
Trainer.train_step = dying
sys.argv = ["launch/pretrain.py", *sys.argv[1:]]
runpy.run_path("launch/pretrain.py", run_name="__main__")
'''


def _env():
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def steps(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_deepspeed_hostfile_no_ssh(tiny_corpus, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path / "run", **{"train.max_steps": 3})]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps(tmp_path / "run") == [1, 2, 3] and "world=2" in r.stdout


def test_torchrun_two_local_nodes(tiny_corpus, tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "launch/pretrain.py",
                               *tiny_overrides(tiny_corpus, tmp_path / "run", **{"train.max_steps": 3})],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][-3000:]
    assert steps(tmp_path / "run") == [1, 2, 3] and "world=2" in outs[0]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "local"])
def test_a_killed_rank_stops_the_launcher(tiny_corpus, tmp_path, launcher):
    script = tmp_path / "dying.py"
    script.write_text(KILL_RANK1)
    run = [str(script), *tiny_overrides(tiny_corpus, tmp_path / "run", **{"train.max_steps": 40})]
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port, *run]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *run]
    else:  # make demo's (megatrain.distributed.local_launch)
        cmd = [sys.executable, "-m", "megatrain.distributed.local_launch", "--nproc", "2", "--port", port, *run]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and log.read_text().count("\n") >= 2):  # rank 1 dies in step 3
            assert proc.poll() is None or log.exists(), "the launcher exited before training"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert code != 0
    assert took < 45, f"{launcher} took {took:.1f}s to notice the dead rank"



def test_accelerate_launch_cpu(tiny_corpus, tmp_path):
    """`accelerate launch --cpu` runs the script once (accelerate starts several CPU processes only through an MPI
    hostfile, whose environment megatrain maps like srun's: tests/unit/test_slurm_env.py); it trains as one rank."""
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path / "run", **{"train.max_steps": 3})]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert steps(tmp_path / "run") == [1, 2, 3] and "world=1" in r.stdout


def test_accelerate_launch_two_processes_on_cpu(tiny_corpus, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two ranks through torchrun,
    and megatrain trains them over gloo like any torchrun launch (the way to get several CPU ranks from
    accelerate without mpirun)."""
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path / "run", **{"train.max_steps": 3})]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert steps(tmp_path / "run") == [1, 2, 3] and "world=2" in r.stdout and "dp=2" in r.stdout


def test_accelerate_cpu_asking_for_two_processes_is_refused(tiny_corpus, tmp_path):
    """`accelerate launch --cpu --num_processes 2` would run one process: megatrain says so in one line."""
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path / "run", **{"train.max_steps": 3})]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode != 0
    assert "error: accelerate launch --cpu --num_processes 2 starts one process" in r.stderr, r.stderr[-2000:]
