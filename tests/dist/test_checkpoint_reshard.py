"""Layout-free checkpoints: save under one layout, resume under another, same next-step losses.

Saved under (tp2, pp1, dp2, ZeRO-1); resumed under (tp1, pp2, dp1), (tp1, pp1, dp1, ZeRO-3) and
(tp2, pp2, dp1). Steps 4–5 must equal the uninterrupted one-process run (2e-5 relative, the layout-parity
tolerance: only reduction order differs). Also: a rank killed mid-save leaves the previous checkpoint and
``latest`` intact.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatrain.testing import ROOT, free_port, run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]
COMMON = {"train.micro_batch_size": 2, "train.global_batch_size": 8, "model.ffn_hidden_size": 128}


def _losses(log_dir) -> dict[int, float]:
    with open(log_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _run(corpus, log_dir, *, tp=1, pp=1, dp=1, **extra):
    argv = tiny_overrides(corpus, log_dir, arch="llama", **COMMON, **{"parallel.tp": tp, "parallel.pp": pp}, **extra)
    run_ranks(tp * pp * dp, ["launch/pretrain.py", *argv], timeout=600)
    return _losses(log_dir)


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    ref = _run(tiny_corpus, tmp_path_factory.mktemp("ref"))
    src = tmp_path_factory.mktemp("src")
    _run(tiny_corpus, src, tp=2, dp=2, **{"train.max_steps": 3, "checkpoint.every": 3, "parallel.zero_stage": 1})
    return ref, src / "checkpoints" / "step_00000003"


@pytest.mark.parametrize("tp, pp, dp, zero", [(1, 2, 1, 1), (1, 1, 1, 3), (2, 2, 1, 1)],
                         ids=["tp1pp2", "tp1pp1-zero3", "tp2pp2"])
def test_resume_under_another_layout(tiny_corpus, tmp_path, saved, tp, pp, dp, zero):
    ref, step_dir = saved
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2 and manifest["layout"]["dp"] == 2
    got = _run(tiny_corpus, tmp_path, tp=tp, pp=pp, dp=dp,
               **{"checkpoint.resume": str(step_dir), "parallel.zero_stage": zero})
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(ref[step], rel=2e-5), (tp, pp, dp, zero, step)


def test_kill_during_save_keeps_previous_checkpoint(tiny_corpus, tmp_path):
    ckpt = tmp_path / "checkpoints"
    _run(tiny_corpus, tmp_path, **{"train.max_steps": 2, "checkpoint.every": 2})
    assert (ckpt / "latest").read_text() == "step_00000002"
    # resume and save every step; kill -9 rank 1 as soon as a new temp dir shows up
    argv = tiny_overrides(tiny_corpus, tmp_path, arch="llama", **COMMON,
                          **{"train.max_steps": 50, "checkpoint.every": 1, "checkpoint.resume": "auto"})
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        procs.append(subprocess.Popen([sys.executable, "launch/pretrain.py", *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and not any(n.startswith(".tmp-") for n in os.listdir(ckpt)):
            time.sleep(0.002)
        procs[1].send_signal(signal.SIGKILL)
    finally:
        time.sleep(1)
        for p in procs:
            p.kill()
            p.wait()
    latest = (ckpt / "latest").read_text()
    assert (ckpt / latest / "manifest.json").is_file()
    # the last good checkpoint still resumes
    got = _run(tiny_corpus, tmp_path, **{"train.max_steps": int(latest[5:]) + 1, "checkpoint.resume": "auto"})
    assert list(got)[-1] == int(latest[5:]) + 1
