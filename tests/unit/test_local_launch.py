"""megatrain.distributed.local_launch: make demo's torch-free launcher (rank variables, thread rule, failures,
forwarded signals). The ranks here are tiny standard-library scripts: the launcher does not care what they run."""
import os
import signal
import subprocess
import sys
import time

from megatrain.distributed.local_launch import rank_env, thread_env
from megatrain.testing import ROOT

LAUNCH = [sys.executable, "-m", "megatrain.distributed.local_launch"]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS"):
        if key not in extra:
            env.pop(key, None)
    return env


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "rank.py"
    path.write_text("import os, sys, time, signal\nrank = int(os.environ['RANK'])\n" + body)
    return str(path)


def test_every_rank_gets_torchruns_variables_and_the_thread_rule(tmp_path):
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "OMP_NUM_THREADS"]
    script = _script(tmp_path, f"open(os.path.join({str(tmp_path)!r}, f'env{{rank}}'), 'w').write("
                               f"' '.join(os.environ[k] for k in {keys!r}) + ' ' + ' '.join(sys.argv[1:]))\n")
    subprocess.run([*LAUNCH, "--nproc", "3", "--port", "29123", script, "--a=1", "b"], env=_env(), check=True,
                   timeout=60)
    threads = thread_env(3, {})["OMP_NUM_THREADS"]
    for r in range(3):
        got = (tmp_path / f"env{r}").read_text().split()
        assert got == [str(r), str(r), "3", "3", "0", "127.0.0.1", "29123", threads, "--a=1", "b"]
    assert rank_env(1, 3, 29123)["RANK"] == "1"


def test_the_users_thread_count_is_kept():
    assert thread_env(2, {"OMP_NUM_THREADS": "5"}) == {}
    cores = len(os.sched_getaffinity(0))
    assert thread_env(2, {}) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}


def test_a_failed_rank_ends_the_launch_with_its_status_and_the_stuck_peer_is_killed(tmp_path):
    script = _script(tmp_path, "if rank == 1:\n    sys.exit(3)\ntime.sleep(120)\n")
    t0 = time.monotonic()
    proc = subprocess.run([*LAUNCH, "--nproc", "2", "--grace", "1", script], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3
    assert time.monotonic() - t0 < 30  # not the peer's 120 s
    assert "rank 1 exited with 3" in proc.stderr and "killing rank 0" in proc.stderr


def test_a_peer_that_fails_on_its_own_within_the_grace_is_not_killed(tmp_path):
    script = _script(tmp_path, "if rank == 0:\n    sys.exit(4)\ntime.sleep(0.5)\nsys.exit(1)\n")
    proc = subprocess.run([*LAUNCH, "--nproc", "2", "--grace", "20", script], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 4 and "killing" not in proc.stderr


def test_sigterm_reaches_every_rank_and_the_launcher_waits_for_them(tmp_path):
    # each rank "saves" for a while after SIGTERM, as a preempted megatrain run does, then exits 75
    script = _script(tmp_path, f"""
def stop(*_):
    time.sleep(1.0)
    open(os.path.join({str(tmp_path)!r}, f'saved{{rank}}'), 'w').close()
    os._exit(75)
signal.signal(signal.SIGTERM, stop)
open(os.path.join({str(tmp_path)!r}, f'up{{rank}}'), 'w').close()
time.sleep(120)
""")
    proc = subprocess.Popen([*LAUNCH, "--nproc", "2", "--grace", "0", script], env=_env())
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"up{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 75
    assert all((tmp_path / f"saved{r}").exists() for r in range(2))  # the launcher did not kill a saving rank


def test_nproc_below_one_is_one_line():
    proc = subprocess.run([*LAUNCH, "--nproc", "0", "x.py"], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "local_launch: --nproc 0 must be at least 1" in proc.stderr
