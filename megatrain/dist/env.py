"""Process bootstrap: one code path for `deepspeed`, `torchrun`, Slurm `srun` and plain `python` launches."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[03-04,09],cpu1" → "gpu03" (the zero padding is kept)."""
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.split(",", 1)[0].split("-", 1)[0].rstrip("]")


def slurm_env(environ: dict) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from a Slurm job step (`srun python launch/pretrain.py ...`, one task per
    rank); {} outside a job step. A batch script or salloc shell has no SLURM_STEP_NUM_TASKS, so a plain `python`
    there stays one rank. MASTER_PORT: the environment's, else derived from the job id (same on every node)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    num_nodes = max(1, int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1"))))
    world = int(environ["SLURM_STEP_NUM_TASKS"])
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(max(1, world // num_nodes)),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)}


def init_distributed(local_rank: int | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank).

    ``deepspeed`` and ``torchrun`` export RANK/WORLD_SIZE/MASTER_*; a plain ``python`` launch has none,
    so a one-rank group on a free loopback port is made (the same code then runs everywhere)."""
    import warnings

    import deepspeed

    # DeepSpeed's ZeRO calls a collective torch has renamed; the warning repeats every step on every rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    os.environ.update(slurm_env(dict(os.environ)))  # srun: one task per rank, no launcher in between
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    from megatrain.dist import comm_counter
    if comm_counter.enabled_by_env():
        comm_counter.enable()  # before DeepSpeed binds torch.distributed functions
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    lr = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(lr)
    return dist.get_rank(), dist.get_world_size(), lr


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, or the only process: the one that writes tables and results."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown_distributed() -> None:
    """Destroy the process groups at the end of a run that succeeded on this rank.

    Without it a gloo rank can abort at interpreter exit ("terminate called without an active exception",
    exit -6): gloo's worker threads still hold finished work objects whose tensors are freed after Python is
    gone. Seen once in ~20 two-rank CI launches. Only on success: a rank that failed leaves its peers blocked
    in a collective, and destroying a group under them would hang instead of exiting."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
