"""Start N ranks of a script on this machine from a parent that never imports torch.

    python -m megatrain.distributed.local_launch --nproc 2 launch/pretrain.py --config recipes/tiny_cpu_gpt.yaml

`make demo` starts its ranks this way. torchrun's parent imports torch (about 3 s on a 2-core machine) before it
starts a rank, and DeepSpeed's runner and its per-node launcher import DeepSpeed twice over; this parent imports
only the standard library, so the ranks start at once (benchmarks/bench_startup.py times all three). For several
machines, or elastic restarts, use torchrun or ``deepspeed``; the ranks run the same code under any of them.

Each rank gets what torchrun exports on one node (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT) and megatrain's thread rule (cores ÷ ranks) as OMP_NUM_THREADS unless the user set it.
Ranks write to this terminal. The first rank to exit non-zero ends the launch: the others get ``grace`` seconds to
fail on their own (a peer's collective errors, and megatrain prints which rank failed first), then are killed;
the launch exits with that rank's status. SIGINT/SIGTERM sent to the launcher are passed to every rank (a
SIGTERM'd megatrain run saves a checkpoint and exits 75) and the launcher waits for them.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from megatrain.distributed.threads import rank_thread_count


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    """The launcher variables of ``rank`` in a one-node group of ``world_size`` ranks, as torchrun sets them."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def thread_env(world_size: int, environ=os.environ) -> dict[str, str]:
    """OMP_NUM_THREADS for each of ``world_size`` local ranks: {} when the user set it (theirs is kept)."""
    if "OMP_NUM_THREADS" in environ:
        return {}
    return {"OMP_NUM_THREADS": str(rank_thread_count({"LOCAL_WORLD_SIZE": str(world_size)})[0])}


def launch(argv: list[str], nproc: int, *, port: int | None = None, grace: float = 10.0, env: dict | None = None,
           cwd: str | None = None, python: str = sys.executable) -> int:
    """Run ``python <argv>`` as ``nproc`` ranks; the exit status of the launch (0, or the first failure's)."""
    if nproc < 1:
        raise SystemExit(f"local_launch: --nproc {nproc} must be at least 1")
    port = port or free_port()
    base = {**os.environ, **(env or {})}
    base.update(thread_env(nproc, base))
    procs = [subprocess.Popen([python, *argv], cwd=cwd, env={**base, **rank_env(r, nproc, port)})
             for r in range(nproc)]
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs, grace, forwarded)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait(procs: list[subprocess.Popen], grace: float, forwarded: list[int]) -> int:
    """Poll the ranks until all have exited; after the first failure, kill those still running ``grace`` s later.
    After a forwarded signal every rank is waited for (each may be saving a checkpoint)."""
    first_failure: tuple[int, int] | None = None  # (rank, status)
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if first_failure is None:
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first_failure = failed[0]
                if not forwarded and any(c is None for c in codes):
                    print(f"local_launch: rank {failed[0][0]} exited with {failed[0][1]}; the other ranks get "
                          f"{grace:g} s to finish", file=sys.stderr, flush=True)
                    deadline = time.monotonic() + grace
        if all(c is not None for c in codes):
            return first_failure[1] if first_failure else 0
        if deadline is not None and not forwarded and time.monotonic() > deadline:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    print(f"local_launch: killing rank {r}", file=sys.stderr, flush=True)
                    p.kill()
            deadline = None
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine")
    parser.add_argument("--port", type=int, default=None, help="MASTER_PORT (default: a free one)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the other ranks get after one fails, before they are killed")
    parser.add_argument("script", help="the Python script every rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    sys.exit(launch([args.script, *args.args], args.nproc, port=args.port, grace=args.grace))


if __name__ == "__main__":
    main()
