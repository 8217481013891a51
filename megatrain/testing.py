"""Test utilities: launch real ranks of a megatrain entry point on one machine (gloo on CPU).

Each rank is a separate ``python`` process with RANK/WORLD_SIZE/MASTER_* set the way ``torchrun`` and the
``deepspeed`` launcher set them, so tests exercise the same bootstrap as users' launches. A rank that
fails or hangs takes the others down and its stderr tail is reported (a hang explains itself).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from megatrain.distributed.local_launch import free_port, rank_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def run_ranks(world_size: int, argv: list[str], *, timeout: float = 300, env: dict | None = None,
              check: bool = True) -> list[RankResult]:
    """Run ``python <argv>`` as ``world_size`` ranks; returns per-rank results (raises on failure if check).

    Each rank writes to its own temp files, not pipes: a rank blocked writing to a full pipe that nobody reads
    yet (the parent waits on rank 0 first) would stall its peers in the next collective, a hang of the
    harness's own making."""
    import tempfile
    port = free_port()
    procs, logs = [], []
    with tempfile.TemporaryDirectory(prefix="megatrain_ranks_") as tmp:
        for rank in range(world_size):
            penv = {**os.environ, **(env or {}), **rank_env(rank, world_size, port), "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"}
            # DS_ACCELERATOR: set by megatrain.toolchain when CUDA is absent
            penv["PYTHONPATH"] = ROOT + os.pathsep + penv.get("PYTHONPATH", "")
            out = open(os.path.join(tmp, f"rank{rank}.out"), "w+")
            err = open(os.path.join(tmp, f"rank{rank}.err"), "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=penv, stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, text=True))
        try:
            return _wait_ranks(procs, logs, timeout=timeout, check=check)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for out, err in logs:
                out.close()
                err.close()


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _wait_ranks(procs, logs, *, timeout: float, check: bool) -> list[RankResult]:
    """Poll every rank: the first that fails (with ``check``) is reported at once and the others are killed,
    instead of waiting out a peer stuck in a collective with the dead rank."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if check and failed:
            rank = failed[0]
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {rank} exited with {codes[rank]}; stderr tail:\n{_read(logs[rank][1])[-4000:]}")
        if all(c is not None for c in codes):
            return [RankResult(r, c, _read(logs[r][0]), _read(logs[r][1])) for r, c in enumerate(codes)]
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            stuck = [r for r, c in enumerate(codes) if c is None]
            raise RuntimeError(f"ranks {stuck} did not finish within {timeout:g}s (hang); rank {stuck[0]} "
                               f"stderr tail:\n{_read(logs[stuck[0]][1])[-3000:]}")
        time.sleep(0.1)


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
