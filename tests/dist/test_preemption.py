"""Preemption under every launcher: a signal to one rank, to the launcher or to the whole process group makes
every rank finish its step, save and exit 75 (no orphans), and the resumed run is bit-identical with 0 steps lost."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatrain.testing import ROOT, free_port, run_ranks
from megatrain.train.preemption import EXIT_PREEMPTED
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# constant LR after warmup: the reference and the interrupted run share the schedule whatever max_steps is
EXTRA = {"train.max_steps": 40, "train.schedule": "constant", "parallel.zero_stage": 1, "checkpoint.keep_last": 1}


def _env(**more):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **more}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        if key not in more:
            env.pop(key, None)
    return env


def records(log_dir) -> list[dict]:
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_step(log_dir, step: int, procs, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in records(log_dir)):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited before step {step}: {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def wait_all(procs, timeout=120) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def saved_step(log_dir) -> int:
    ckpt = os.path.join(log_dir, "checkpoints")
    with open(os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip(), "manifest.json")) as f:
        return json.load(f)["step"]


def losses(log_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(log_dir)}


def start_ranks(world, argv, log_dir):
    port, procs = free_port(), []
    out = open(os.path.join(log_dir, "ranks.log"), "w")
    for rank in range(world):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=out,
                                      stdin=subprocess.DEVNULL))
    return procs


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ref")
    run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, log_dir, **EXTRA)], timeout=400)
    return losses(log_dir)


def test_signal_to_one_rank_saves_every_rank_and_resume_is_bit_identical(tiny_corpus, tmp_path, reference):
    os.makedirs(tmp_path, exist_ok=True)
    argv = ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path, **EXTRA)]
    procs = start_ranks(2, argv, tmp_path)
    try:
        wait_for_step(tmp_path, 3, procs)
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told
        assert wait_all(procs) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    finally:
        for p in procs:
            p.kill()
    stopped = max(r["step"] for r in records(tmp_path))
    assert 3 <= stopped < 40 and saved_step(tmp_path) == stopped  # 0 steps lost
    assert "preempted (a signal on another rank) after step" in open(tmp_path / "ranks.log").read()
    run_ranks(2, argv + ["--checkpoint.resume=auto"], timeout=400)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 41))
    assert got == reference  # bit-identical, not approximately


def _launch(cmd, log_dir):
    out = open(os.path.join(log_dir, "launcher.log"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _no_orphans(family, timeout=90):
    gone, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"processes left running: {[p.cmdline() for p in alive]}"


def _ranks_of(launcher, n=2, timeout=120):
    """The launcher's descendants once its n rank processes exist (they run launch/pretrain.py)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(launcher.pid).children(recursive=True)
        cmds = [" ".join(k.cmdline()) for k in kids]
        if sum("launch/pretrain.py" in c and not any(x in c for x in ("deepspeed.launcher", "distributed.run",
                                                                      "local_launch")) for c in cmds) >= n:
            return kids
        time.sleep(0.2)
    raise AssertionError("ranks never started")


@pytest.mark.parametrize("launcher,target", [("deepspeed", "launcher"), ("torchrun", "group"),
                                             ("torchrun", "launcher"), ("local", "launcher")])
def test_signal_reaches_every_rank_under_launchers(tiny_corpus, tmp_path, launcher, target):
    overrides = tiny_overrides(tiny_corpus, tmp_path, **EXTRA)
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), "launch/pretrain.py", *overrides]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "launch/pretrain.py", *overrides]
    else:  # make demo's: forwards the signal to every rank and waits for their saves
        cmd = [sys.executable, "-m", "megatrain.distributed.local_launch", "--nproc", "2", "--port",
               str(free_port()), "launch/pretrain.py", *overrides]
    proc = _launch(cmd, tmp_path)
    try:
        family = _ranks_of(proc)
        wait_for_step(tmp_path, 3, [proc])
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:  # the deepspeed runner dies of it without telling its children: the ranks notice by themselves
            proc.send_signal(signal.SIGTERM)
        _no_orphans(family)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    stopped = max(r["step"] for r in records(tmp_path))
    assert stopped < 40 and saved_step(tmp_path) == stopped, open(tmp_path / "launcher.log").read()[-3000:]


def test_python_launch_sigint_saves_and_exits_75(tiny_corpus, tmp_path):
    argv = ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path, **EXTRA)]
    out = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(), stdout=out, stderr=out)
    try:
        wait_for_step(tmp_path, 2, [proc])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == EXIT_PREEMPTED
    finally:
        proc.kill()
    stopped = max(r["step"] for r in records(tmp_path))
    assert saved_step(tmp_path) == stopped < 40
    assert not os.path.exists(tmp_path / ".megatrain.lock")  # released on the way out
