"""Process bootstrap: one code path for `deepspeed`, `torchrun` and plain `python` launches."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# On GPU machines the default group gets both backends: NCCL for CUDA tensors and gloo for CPU ones, so a
# collective handed a host tensor (a statistic, a checkpoint slice) still works instead of failing with
# "No backend type associated with device type cpu". torch accepts the device:backend list in
# init_process_group, and DeepSpeed 0.19 passes the string through unchanged (comm/torch.py).
MIXED_BACKEND = "cpu:gloo,cuda:nccl"


def default_backend(cuda_available: bool | None = None) -> str:
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return MIXED_BACKEND if cuda_available else "gloo"


def init_distributed(local_rank: int | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank).

    ``deepspeed`` and ``torchrun`` export RANK/WORLD_SIZE/MASTER_*; a plain ``python`` launch has none,
    so a one-rank group on a free loopback port is made (the same code then runs everywhere)."""
    import warnings

    import deepspeed

    # DeepSpeed's ZeRO calls a collective torch has renamed; the warning repeats every step on every rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    from megatrain.distributed import comm_counter
    if comm_counter.enabled_by_env():
        comm_counter.enable()  # before DeepSpeed binds torch.distributed functions
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=default_backend(), verbose=False)
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
