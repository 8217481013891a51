"""Threads per rank, without importing torch: launchers (the demo) read the same rule before any rank starts."""
from __future__ import annotations

import os


def local_rank_count(environ=os.environ) -> int:
    """Ranks on this machine, from whichever launcher started us (1 for a plain ``python`` launch)."""
    # torchrun/torch.multiprocessing harnesses: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if environ.get(key, "").isdigit() and int(environ[key]) > 0:
            return int(environ[key])
    return 1


def rank_thread_count(environ=os.environ, cores: int | None = None) -> tuple[int, str]:
    """(threads per rank, why): the user's OMP_NUM_THREADS, else this process's cores ÷ local ranks.

    The deepspeed launcher sets no thread count, so each of 2 ranks on 2 cores ran 2 threads: oversubscribed,
    12% slower than 1 thread per rank on the demo (issue 19). torchrun exports OMP_NUM_THREADS=1 itself,
    which this rule then keeps."""
    user = environ.get("OMP_NUM_THREADS", "")
    if user.isdigit() and int(user) > 0:
        return int(user), "OMP_NUM_THREADS"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = local_rank_count(environ)
    return max(1, cores // ranks), f"{cores} cores / {ranks} local ranks"
