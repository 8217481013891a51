"""Exclusive run directories: a live holder refuses a second run in one line, a dead one is taken over, and a
resumed log.dir is a separate numbered segment of metrics.jsonl."""
import json
import os
import socket
import subprocess
import sys

import pytest

from megatrain.errors import ConfigError
from megatrain.train.logging import RunLogger
from megatrain.train.run_lock import LOCK_NAME, RunLock


def test_second_holder_is_refused_in_one_line(tmp_path):
    lock = RunLock({"log.dir": str(tmp_path)})
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # another process (a live one: a child that sleeps) tries the same directory
    code = ("import sys; from megatrain.train.run_lock import RunLock\n"
            "try:\n RunLock({'log.dir': sys.argv[1]})\nexcept ValueError as e:\n print(e); sys.exit(2)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2 and r.stdout.count("\n") == 1
    assert f"log.dir={tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()}" in r.stdout
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_same_dir_twice_in_one_config_is_one_lock(tmp_path):
    lock = RunLock({"log.dir": str(tmp_path), "checkpoint.dir": str(tmp_path)})
    assert len(lock.paths) == 1
    with pytest.raises(ConfigError, match=r"checkpoint.dir=.* is in use"):
        RunLock({"checkpoint.dir": str(tmp_path)}).release()  # same pid, but a live holder: refused
    lock.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "x"}))
    lock = RunLock({"log.dir": str(tmp_path)})
    assert "taking over stale lock" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    # our own pid with another start time: the process that wrote the lock is gone, the pid was reused
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "1"}))
    RunLock({"log.dir": str(tmp_path)}).release()


def test_lock_on_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "other-node", "pid": 1, "since": "x"}))
    with pytest.raises(ConfigError, match="in use by pid 1 on other-node"):
        RunLock({"log.dir": str(tmp_path)})
    assert (tmp_path / LOCK_NAME).exists()


def test_resume_is_a_separate_segment(tmp_path):
    def write(start, steps):
        log = RunLogger(str(tmp_path), total_steps=9, start_step=start, progress="none", tensorboard=False,
                        active=True)
        for s in steps:
            log.log({"step": s, "loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0})
        log.close()
    write(0, [1, 2, 3, 4])
    write(2, [3, 4, 5])  # resumed from step 2: records past it are dropped, the new ones are run 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["run"]) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    starts = [json.loads(line) for line in open(tmp_path / "runs.jsonl")]
    assert [(s["run"], s["start_step"]) for s in starts] == [(1, 0), (2, 2)]
    write(0, [1])  # a fresh run from step 0 on a finished dir starts over as run 1
    assert [(json.loads(l)["step"], json.loads(l)["run"]) for l in open(tmp_path / "metrics.jsonl")] == [(1, 1)]


@pytest.mark.slow
def test_pretrain_on_a_locked_log_dir_exits_2_in_one_line(tiny_corpus, tmp_path):
    from megatrain.testing import run_ranks
    from tests.conftest import tiny_overrides
    lock = RunLock({"log.dir": str(tmp_path)})  # a live run (this test process) holds the directory
    try:
        r = run_ranks(1, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path)], check=False)[0]
    finally:
        lock.release()
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: log.dir={tmp_path} is in use by pid {os.getpid()}")
    assert not (tmp_path / "metrics.jsonl").exists()
