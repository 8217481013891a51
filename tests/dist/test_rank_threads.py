"""Per-rank thread count: cores ÷ local ranks unless the user set OMP_NUM_THREADS, on every launcher path."""
import json
import os
import subprocess
import sys

import pytest

from megatrain.distributed.env import rank_thread_count
from megatrain.testing import ROOT, free_port

RANK_SCRIPT = """
import json, os, subprocess, sys
import torch
from megatrain.distributed.env import init_distributed, shutdown_distributed
rank, world, _ = init_distributed()
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('OMP_NUM_THREADS'))"],
                       capture_output=True, text=True).stdout.strip()
print("THREADS " + json.dumps({"rank": rank, "world": world, "torch": torch.get_num_threads(), "child_env": child}))
shutdown_distributed()
"""


@pytest.mark.parametrize("environ, cores, expected", [
    ({}, 8, 8),                                             # plain python: every core
    ({"LOCAL_SIZE": "2", "RANK": "0"}, 2, 1),               # deepspeed launcher, 2 ranks on 2 cores
    ({"LOCAL_SIZE": "4", "RANK": "0"}, 16, 4),
    ({"LOCAL_WORLD_SIZE": "3", "RANK": "0"}, 2, 1),         # more ranks than cores: never 0
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, 2, 3),    # the user's choice wins
])
def test_rule(environ, cores, expected):
    assert rank_thread_count(environ, cores)[0] == expected


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_launcher_ranks_get_cores_over_local_ranks(tmp_path):
    # the README's `deepspeed --num_gpus 2` path, which exports no thread count of its own
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                           "--master_port", str(free_port()), str(script)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line.split("THREADS ", 1)[1]) for line in proc.stdout.splitlines() if "THREADS " in line]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    for r in rows:
        assert r["torch"] == expected and r["child_env"] == str(expected), r
