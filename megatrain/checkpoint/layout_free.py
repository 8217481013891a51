"""Save and resume training under any parallel layout.

Save (collective): every rank gathers its stage's parameters and Adam moments into logical tensors
(ZeRO partitions over dp, shards over tp); the first tp rank of data-parallel replica 0 of each pipeline
stage writes them; rank 0 writes the manifest and publishes the step (rename + ``latest``).
Resume: rank 0 verifies sizes and checksums of every file (streaming, tensor by tensor) and the model
sizes against the config; parameters are materialised straight from the files into the new layout;
after deepspeed.initialize the fp32 master weights and moments are resharded into the optimizer.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatrain.parallelize.param_spec import spec_of
from megatrain.distributed import host_collectives as hc
from megatrain.checkpoint.engine_state import gather_state, optimizer_step_count
from megatrain.checkpoint.store import (FORMAT, CheckpointError, CheckpointSource, atomic_write_text, commit,
                                        read_manifest, tag_for, verify_file, write_tensors)

# model.* fields that decide tensor shapes: a checkpoint loads only into a model that agrees on them
SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                "max_seq_len", "tie_embeddings", "num_classes", "in_channels", "widths", "blocks_per_stage", "block",
                "bidirectional", "task", "inner_widths", "rnn_hidden_size")


@dataclass
class ResumeSource:
    step_dir: str
    manifest: dict
    model: CheckpointSource
    optim: CheckpointSource


class SaveError(CheckpointError):
    """A save that did not happen (disk full, I/O error, a non-finite tensor); nothing of it is left behind."""


def _io_failure(err: BaseException) -> bool:
    """A write that failed in the OS (ENOSPC, EIO, ...), also when raised through safetensors' Rust writer."""
    from safetensors import SafetensorError
    return isinstance(err, OSError) or (isinstance(err, SafetensorError) and _os_errno(str(err)) is not None)


def _os_errno(text: str) -> int | None:
    """The errno in safetensors' message ("I/O error: No space left on device (os error 28)")."""
    import re
    m = re.search(r"os error (\d+)", text)
    return int(m.group(1)) if m else None


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError):
        where = f" writing {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return os.strerror(_os_errno(str(err)))


def _agree(error: str) -> str:
    """Every rank's error (or ""), gathered on every rank; the first failure, prefixed with its rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return f"rank 0: {error}" if error else ""
    errors = hc.all_gather_object(error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), "")


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(engine, dims, ckpt_dir: str, step: int, state: dict, *, keep_last: int,
                    with_optimizer: bool = True) -> str:
    """Collective save of ``step``. A failure on any rank (an OS error while writing, or a non-finite tensor)
    is agreed by every rank at the next synchronisation point: the partial step is removed, ``latest`` is
    untouched and every rank raises the same one-line ``SaveError``."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tmp, final = os.path.join(ckpt_dir, f".tmp-{tag}"), os.path.join(ckpt_dir, tag)

    def fail_if(error: str) -> None:
        error = _agree(error)
        if not error:
            return
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ():
                if name.startswith("latest.tmp."):  # a pointer update that did not complete
                    os.remove(os.path.join(ckpt_dir, name))
        previous = _latest_tag(ckpt_dir)
        raise SaveError(f"checkpoint save at step {step} failed on {error}; the partial save was removed and "
                        f"{'latest still points to ' + previous if previous else 'no checkpoint was published'} "
                        f"(checkpoint.dir={ckpt_dir}; free space or fix the disk, or set "
                        "checkpoint.on_save_error=continue)")

    error = ""
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            error = _describe(err)
    fail_if(error)  # (replaces a barrier: the directory exists before anyone writes into it)
    stage = dims.pp_rank if dims is not None else 0
    writer = dims is None or (dims.tp_rank == 0 and dims.dp_rank == 0)
    model, optim = {}, {}
    for p, value, moments in gather_state(engine, dims, with_optimizer=with_optimizer):
        # the tied token table lives on the first and last stage; the first stage writes it
        spec = spec_of(p)
        if writer and not (stage > 0 and spec.pipeline_tied):
            model[spec.logical_name] = value
            optim.update({f"{spec.logical_name}.{k}": v for k, v in moments.items()})
    for name, buf in engine.module.named_buffers():
        if writer and spec_of(buf) is not None:
            model[spec_of(buf).logical_name] = buf.detach().cpu()
    error = ""
    if writer:
        bad = _first_nonfinite(model) or _first_nonfinite(optim)
        if bad:
            error = f"tensor {bad!r} is not finite (a checkpoint with non-finite values is never written)"
        else:
            try:
                files = {f"model-s{stage}.safetensors": write_tensors(os.path.join(tmp, f"model-s{stage}.safetensors"), model)}
                if optim:
                    files[f"optim-s{stage}.safetensors"] = write_tensors(os.path.join(tmp, f"optim-s{stage}.safetensors"), optim)
                atomic_write_text(os.path.join(tmp, f"index-s{stage}.json"), json.dumps(files))
            except Exception as err:  # noqa: BLE001 - only OS write failures are handled; the rest re-raise
                if not _io_failure(err):
                    raise
                error = _describe(err)
    fail_if(error)
    error = ""
    if rank == 0:
        try:
            files = {}
            for name in sorted(os.listdir(tmp)):
                if name.startswith("index-s"):
                    with open(os.path.join(tmp, name), encoding="utf-8") as f:
                        files.update(json.load(f))
                    os.remove(os.path.join(tmp, name))
            manifest = {"format": FORMAT, "step": step, "optimizer_step": optimizer_step_count(engine),
                        "has_optimizer": with_optimizer, **state, "files": files}
            atomic_write_text(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1))
            before = _latest_tag(ckpt_dir)
            try:
                commit(tmp, final, ckpt_dir, keep_last=keep_last)
            except OSError:
                if _latest_tag(ckpt_dir) == before and before != tag:  # renamed but not published: not a checkpoint
                    shutil.rmtree(final, ignore_errors=True)
                raise
        except OSError as err:
            error = _describe(err)
    fail_if(error)
    return final


def _latest_tag(ckpt_dir: str) -> str | None:
    try:
        with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _check_model(manifest: dict, model_cfg, step_dir: str) -> None:
    saved = manifest.get("config", {}).get("model", {})
    for field in SHAPE_FIELDS:
        if field in saved and saved[field] != getattr(model_cfg, field):
            raise CheckpointError(f"checkpoint {step_dir} was written for model.{field}={saved[field]!r} but the "
                                  f"config has {getattr(model_cfg, field)!r}; use the checkpoint's model settings")


def open_resume(step_dir: str, model_cfg, *, verify: bool = True) -> ResumeSource:
    """Verify and open a checkpoint for loading.

    One process: sizes and headers now, each tensor's crc32 while it is read (one pass over the files).
    Several ranks: the files are dealt out by size, each rank streams the crc of its share (every byte is
    checksummed once in the job, not all of them on rank 0), and the verdicts are gathered before anyone
    loads, so a corrupt file stops all ranks at the same point with the same line instead of one rank
    failing mid-load while its peers wait in a collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    error = ""
    try:
        manifest = read_manifest(step_dir)
        _check_model(manifest, model_cfg, step_dir)
        if verify and world > 1:
            for fname in verification_share(manifest, rank=dist.get_rank(), world=world):
                verify_file(os.path.join(step_dir, fname), manifest["files"][fname])
    except CheckpointError as err:
        error = str(err)
    if world > 1:
        error = next((e for e in hc.all_gather_object(error) if e), "")  # the lowest failing rank's line
    if error:
        raise CheckpointError(error)
    in_read = verify and world == 1
    return ResumeSource(step_dir, manifest, CheckpointSource(step_dir, manifest, prefix="model", verify=in_read),
                        CheckpointSource(step_dir, manifest, prefix="optim", verify=in_read))


def verification_share(manifest: dict, *, rank: int, world: int) -> list[str]:
    """The files this rank checksums: largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world
    mine = []
    sizes = {f: int(e.get("bytes", 0)) for f, e in manifest["files"].items()}
    for fname in sorted(sizes, key=lambda f: (-sizes[f], f)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[fname] or 1
        if r == rank:
            mine.append(fname)
    return mine


def load_model_state(path: str):
    """(Config, {logical name: full tensor}) of a checkpoint step dir (or a run's checkpoint dir) — for
    scripts and compression passes that want the plain model. Checksums are verified while reading."""
    from megatrain.checkpoint.store import latest_step_dir
    from megatrain.config import build_config
    step_dir = path if os.path.isfile(os.path.join(path, "manifest.json")) else latest_step_dir(path)
    if step_dir is None:
        raise CheckpointError(f"{path}: no checkpoint found (no manifest.json or latest)")
    manifest = read_manifest(step_dir)
    src = CheckpointSource(step_dir, manifest, prefix="model", verify=True)
    return build_config(manifest["config"]), {name: src.tensor(name) for name in src.where}
