"""Process bootstrap: one code path for `deepspeed`, `torchrun`, Slurm `srun` and plain `python` launches."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from megatrain.distributed.threads import local_rank_count, rank_thread_count  # noqa: F401 (re-exported)


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


def set_rank_threads() -> int:
    """Apply ``rank_thread_count`` to torch; called first thing where every launcher path's ranks start.

    A launched rank (RANK set by deepspeed/torchrun) also exports it, so its own children (data workers, JIT
    builds) inherit the same budget. A plain one-process run does not: its value is just "all cores", and
    exporting it would read as a user's choice to any launcher that process starts later."""
    threads, _ = rank_thread_count()
    if "RANK" in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


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


def _env_int(environ: dict, key: str, default: str | None = None) -> int:
    """A launcher's integer variable, or one line naming it (a broken job environment is not a traceback)."""
    from megatrain.errors import ConfigError
    raw = environ.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"environment {key}={raw!r} is not an integer; the launcher sets it — unset it or fix the "
                          "job script") from None
    if value < 0:
        raise ConfigError(f"environment {key}={value} is negative; the launcher sets it — unset it or fix the job script")
    return value


def slurm_env(environ: dict) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from a Slurm job step (`srun python launch/pretrain.py ...`, one task per
    rank); {} outside a job step. A batch script or salloc shell has no SLURM_STEP_NUM_TASKS, so a plain `python`
    there stays one rank. MASTER_PORT: the environment's, else derived from the job id (same on every node)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    nodes_key = "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in environ else "SLURM_NNODES"
    num_nodes = max(1, _env_int(environ, nodes_key, "1"))
    world = _env_int(environ, "SLURM_STEP_NUM_TASKS")
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID"):
        _env_int(environ, key, "0")
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(max(1, world // num_nodes)),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)}


# (rank, size, local rank, local size) as MPI launchers export them: Open MPI, then MPICH / Intel MPI (PMI).
_MPI_KEYS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
             ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))


def mpi_env(environ: dict) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_* from an MPI launch (`mpirun`, also what `accelerate launch --cpu` with an
    ``--mpirun_hostfile`` runs); {} otherwise. MASTER_ADDR/PORT must come from the launcher (accelerate sets them)."""
    if "RANK" in environ:
        return {}
    for rank, size, local_rank, local_size in _MPI_KEYS:
        if rank in environ and size in environ:
            for key in (rank, size, local_rank, local_size):
                _env_int(environ, key, "0")
            return {"RANK": environ[rank], "WORLD_SIZE": environ[size], "LOCAL_RANK": environ.get(local_rank, "0"),
                    "LOCAL_WORLD_SIZE": environ.get(local_size, "1"),
                    "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
                    "MASTER_PORT": environ.get("MASTER_PORT", "29500")}
    return {}


def _parent_cmdline() -> list[str]:
    """The launching process's argv (Linux /proc), [] where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _asked_processes(argv: list[str]) -> int:
    """``--num_processes N`` (or ``--num-processes``, ``=N``) in an accelerate command line; 0 when absent."""
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (
                argv[i + 1] if arg == flag and i + 1 < len(argv) else None)
            if value is not None:
                return int(value) if value.isdigit() else 0
    return 0


def check_accelerate(environ: dict, parent_argv: list[str] | None = None) -> None:
    """``accelerate launch`` runs megatrain like torchrun (GPUs, or ``--multi_gpu`` on CPUs) or as one process
    (``--cpu`` without an MPI hostfile). ``--cpu --num_processes 2`` would silently train one rank, and its
    DeepSpeed plugin would configure a second DeepSpeed: both are refused in one line."""
    from megatrain.errors import ConfigError
    if environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "RANK" not in environ \
            and not any(k in environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        asked = _asked_processes(_parent_cmdline() if parent_argv is None else parent_argv)
        if asked > 1:
            raise ConfigError(f"accelerate launch --cpu --num_processes {asked} starts one process (accelerate "
                              "runs several CPU processes only through mpirun); use accelerate launch --multi_gpu "
                              f"--num_processes {asked} (it works without GPUs, through torchrun) or torchrun")
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("accelerate launch --use_deepspeed: accelerate's DeepSpeed plugin settings are not read, "
                          "megatrain configures DeepSpeed from the recipe (parallel.zero_stage, train.precision, "
                          "train.deepspeed_config); launch without --use_deepspeed")
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("accelerate launch --use_fsdp: megatrain shards with DeepSpeed ZeRO (parallel.zero_stage); "
                          "launch without --use_fsdp")


def launcher_env(environ: dict) -> dict[str, str]:
    """The RANK/WORLD_SIZE/MASTER_* a launcher that does not export them implies (Slurm srun, MPI)."""
    check_accelerate(environ)
    return slurm_env(environ) or mpi_env(environ)


def init_distributed(local_rank: int | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank).

    ``deepspeed`` and ``torchrun`` export RANK/WORLD_SIZE/MASTER_*; a plain ``python`` launch has none,
    so a one-rank group on a free loopback port is made (the same code then runs everywhere)."""
    import warnings

    set_rank_threads()
    from megatrain.toolchain import prepare_process
    prepare_process()  # before deepspeed is imported: it picks its accelerator then, and JIT-builds its comm op

    import deepspeed

    from megatrain.distributed.deepspeed_startup import defer_deepspeed_compile
    defer_deepspeed_compile()  # before any engine is built: DeepSpeed's Muon import would load torch._inductor
    # DeepSpeed's ZeRO calls a collective torch has renamed; the warning repeats every step on every rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    os.environ.update(launcher_env(dict(os.environ)))  # srun / mpirun: one task per rank, no RANK exported
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
