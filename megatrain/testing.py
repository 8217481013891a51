"""Test utilities: launch real ranks of a megatrain entry point on one machine (gloo on CPU).

Each rank is a separate ``python`` process with RANK/WORLD_SIZE/MASTER_* set the way ``torchrun`` and the
``deepspeed`` launcher set them, so tests exercise the same bootstrap as users' launches. A rank that
fails or hangs takes the others down and its stderr tail is reported (a hang explains itself).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, argv: list[str], *, timeout: float = 300, env: dict | None = None,
              check: bool = True) -> list[RankResult]:
    """Run ``python <argv>`` as ``world_size`` ranks; returns per-rank results (raises on failure if check)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        penv = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # DS_ACCELERATOR: set by megatrain when CUDA is absent
        penv["PYTHONPATH"] = ROOT + os.pathsep + penv.get("PYTHONPATH", "")
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=penv, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results: list[RankResult | None] = [None] * world_size
    try:
        for rank, proc in enumerate(procs):
            left = max(deadline - time.monotonic(), 1)
            try:
                out, err = proc.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                out, err = proc.communicate()
                raise RuntimeError(f"rank {rank} did not finish within {timeout}s (hang); stderr tail:\n{err[-3000:]}")
            results[rank] = RankResult(rank, proc.returncode, out, err)
            if proc.returncode != 0 and check:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"rank {rank} exited with {proc.returncode}; stderr tail:\n{err[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results  # type: ignore[return-value]


def _spawned(rank: int, world_size: int, init_file: str, fn, args) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_group(world_size: int, fn, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in one gloo group.
    ``fn`` must be importable (module level). An exception in any rank fails the call."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(world_size, os.path.join(tmp, "init"), fn, args), nprocs=world_size, join=True)
