"""Checkpoints through DeepSpeed's engine, with megatrain's guarantees on top:

- one directory per step (``step_00000042``); ``latest`` is written by megatrain *after* every rank
  finished writing (temp file + fsync + rename), so a crash mid-save leaves ``latest`` on the last good one;
- keep-last-N rotation that never deletes the newest complete checkpoint;
- the trainer state (step, data position, seed, layout) travels in DeepSpeed's client_state and a JSON
  ``megatrain.json`` beside it; RNG is re-derived per (seed, step, rank), so it needs no saving.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch.distributed as dist

_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def latest_tag(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path, encoding="utf-8").read().strip()
    if not os.path.isfile(os.path.join(ckpt_dir, tag, "megatrain.json")):
        raise ValueError(f"checkpoint: {path} points to {tag!r}, which is incomplete or missing; "
                         "fix the pointer or pass --checkpoint.resume=<dir>/<tag> of a complete checkpoint")
    return tag


def save(engine, ckpt_dir: str, step: int, state: dict, *, keep_last: int) -> str:
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"megatrain": state}, save_latest=False)
    dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if rank == 0:
        atomic_write_text(os.path.join(ckpt_dir, tag, "megatrain.json"), json.dumps(state, indent=1))
        atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        rotate(ckpt_dir, keep_last=keep_last, newest=tag)
    dist.barrier()
    return os.path.join(ckpt_dir, tag)


def rotate(ckpt_dir: str, *, keep_last: int, newest: str) -> None:
    tags = sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t))
    complete = [t for t in tags if os.path.isfile(os.path.join(ckpt_dir, t, "megatrain.json"))]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    # An incomplete directory older than the newest complete one is debris from a crashed save.
    doomed += [t for t in tags if t not in complete and t < newest]
    for tag in doomed:
        if tag != newest:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def resolve_resume(resume: str, ckpt_dir: str) -> tuple[str, str] | None:
    """(directory, tag) to load, or None. ``resume`` is 'none', 'auto' or a checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
        return (ckpt_dir, tag) if tag else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, "latest")):
        tag = latest_tag(path)
        if tag is None:
            raise ValueError(f"checkpoint.resume={resume}: no checkpoint in it")
        return path, tag
    if os.path.isfile(os.path.join(path, "megatrain.json")):
        return os.path.dirname(path), os.path.basename(path)
    raise ValueError(f"checkpoint.resume={resume}: not a checkpoint (no megatrain.json or latest); "
                     "pass a run's checkpoint dir, one step_XXXXXXXX dir, 'auto' or 'none'")


def load(engine, where: tuple[str, str], *, load_optimizer: bool) -> dict:
    ckpt_dir, tag = where
    with open(os.path.join(ckpt_dir, tag, "megatrain.json"), encoding="utf-8") as f:
        meta = json.load(f)
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer, load_module_strict=True)
    if path is None:
        raise ValueError(f"checkpoint {os.path.join(ckpt_dir, tag)}: DeepSpeed found no loadable state in it "
                         "(was it written under a different parallel layout?)")
    return meta
