"""Checks of a training launch that need only the config and the environment, run before any model, process
group or GPU: the launcher's WORLD_SIZE, the kernel backend on this machine, the output directories and the
merged DeepSpeed config. Each failure is one :class:`ConfigError` line naming the field (or variable) and the fix."""
from __future__ import annotations

import os

from megatrain.config.layout import resolve_layout
from megatrain.config.schema import Config
from megatrain.errors import ConfigError

GPU_BACKENDS = ("triton", "cuda")


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher exported it (1 when unset), refused in one line when it is not a positive integer."""
    raw = os.environ.get("WORLD_SIZE", "1").strip()
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world <= 0:
        raise ConfigError(f"environment WORLD_SIZE={raw!r} is not a positive integer; unset it or launch with "
                          "deepspeed/torchrun, which set it")
    return world


def check_kernels(cfg: Config) -> None:
    """model.kernels / kernel_overrides naming a GPU backend on a machine without CUDA: refused now, not as a
    per-rank traceback at the first forward."""
    import torch
    if torch.cuda.is_available():
        return  # which ops each backend covers is resolved (with its own one-line error) at model build
    wanted = [("model.kernels", cfg.model.kernels)] + [(f"model.kernel_overrides.{op}", b)
                                                         for op, b in cfg.model.kernel_overrides.items()]
    for field, backend in wanted:
        if backend in GPU_BACKENDS:
            raise ConfigError(f"{field}={backend} needs a CUDA GPU and none is visible; use {field.split('.')[0]}."
                              f"{field.split('.', 1)[1]}=auto (or torch) on this machine")


def check_output_dir(field: str, path: str | None) -> None:
    """A directory the run will create or write: it must be a directory (or not exist yet) under a writable
    existing directory."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{field}={path} is a file, not a directory; point {field} at a directory")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{field}={path}: {probe} is a file, so the directory cannot be created; "
                          f"choose another {field}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={path}: {probe} is not writable by this user; choose another {field} or "
                          "fix its permissions")


def check_outputs(cfg: Config) -> None:
    check_output_dir("log.dir", cfg.log.dir)
    check_output_dir("checkpoint.dir", cfg.checkpoint.dir)
    check_output_dir("checkpoint.export_hf", cfg.checkpoint.export_hf)
    check_output_dir("checkpoint.export_peft", cfg.checkpoint.export_peft)


def preflight(cfg: Config) -> int:
    """Every check above plus the layout and the merged DeepSpeed config; returns the launched world size."""
    from megatrain.config.deepspeed import to_deepspeed, validate_deepspeed
    world = launched_world_size()
    check_kernels(cfg)
    check_outputs(cfg)
    layout = resolve_layout(cfg, world)
    validate_deepspeed(to_deepspeed(cfg, layout))
    return world
