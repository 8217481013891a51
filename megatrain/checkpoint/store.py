"""On-disk format of layout-free checkpoints, and its integrity checks.

    <dir>/step_00000042/
        manifest.json                 format, step, config, layout it was written under, data position,
                                      files → tensors with shape, dtype, crc32; written last
        model-s<k>.safetensors        full (unsharded) fp32 parameters held by pipeline stage k
        optim-s<k>.safetensors        "<name>.exp_avg" / "<name>.exp_avg_sq" per parameter, full, fp32
    <dir>/latest                      name of the newest complete checkpoint, replaced atomically

A step is written into ``.tmp-step_…`` and renamed when every file and the manifest are on disk and
fsynced, so a crash mid-save leaves the previous checkpoint and ``latest`` untouched. Nothing is
unpickled: tensors are safetensors, metadata is JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib

import torch

from megatrain.fsutil import atomic_write_text, fsync_dir  # noqa: F401 (re-exported)

FORMAT = "megatrain-checkpoint/1"
_TAG = re.compile(r"^step_(\d{8})$")


from megatrain.errors import CheckpointError  # noqa: F401 (re-exported)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def crc32_of(t: torch.Tensor) -> int:
    return zlib.crc32(t.reshape(-1).contiguous().view(torch.uint8).numpy()) if t.numel() else 0  # 0-dim too


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write a safetensors file (fsynced); returns its manifest entry."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "crc32": crc32_of(v)}
                        for k, v in tensors.items()}}


def _header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"checkpoint file {path} is truncated ({size} bytes); resume from an earlier step")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise CheckpointError(f"checkpoint file {path} is truncated or not safetensors (header {n} bytes, file {size})")
        return json.loads(f.read(n)), 8 + n


def verify_file(path: str, entry: dict) -> None:
    """Size, header and per-tensor crc32 against the manifest. Streams tensor by tensor."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, resume from another step")
    if os.path.getsize(path) != entry["bytes"]:
        raise CheckpointError(f"checkpoint file {path} has {os.path.getsize(path)} bytes, manifest says "
                              f"{entry['bytes']} (truncated or replaced); resume from an earlier step")
    header, base = _header(path)
    with open(path, "rb") as f:
        for name, meta in entry["tensors"].items():
            if name not in header:
                raise CheckpointError(f"checkpoint file {path} lacks tensor {name!r} listed in the manifest")
            start, stop = header[name]["data_offsets"]
            f.seek(base + start)
            crc, left = 0, stop - start
            while left:
                chunk = f.read(min(left, 64 << 20))
                if not chunk:
                    raise CheckpointError(f"checkpoint file {path}: tensor {name!r} is truncated")
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            if crc != meta["crc32"]:
                raise CheckpointError(f"checkpoint file {path}: tensor {name!r} fails its checksum (corrupt); "
                                      "restore the file or resume from an earlier step")


def read_manifest(step_dir: str) -> dict:
    path = os.path.join(step_dir, "manifest.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{step_dir} is not a complete megatrain checkpoint (no manifest.json); "
                              "pass a run's checkpoint dir, a step_XXXXXXXX dir, 'auto' or 'none'")
    from megatrain.safe_io import read_json
    manifest = read_json(path, what="checkpoint manifest", fix="the checkpoint is corrupt; resume from another step",
                         error=CheckpointError)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for key, kind in (("files", dict), ("step", int), ("config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"checkpoint manifest {path}: field {key!r} missing or not {'an integer' if kind is int else 'an object'}; "
                                  "the checkpoint is corrupt, resume from another step")
    for fname, entry in manifest["files"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(
                entry.get("tensors"), dict) or os.sep in fname or fname in (".", "..")):
            raise CheckpointError(f"checkpoint manifest {path}: entry {fname!r} of 'files' is malformed; the "
                                  "checkpoint is corrupt, resume from another step")
    return manifest


def latest_step_dir(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    step_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isfile(os.path.join(step_dir, "manifest.json")):
        raise CheckpointError(f"{path} points to {tag!r}, which is incomplete or missing; fix the pointer or "
                              "pass --checkpoint.resume=<dir>/step_XXXXXXXX")
    return step_dir


def resolve_resume(resume: str, ckpt_dir: str) -> str | None:
    """The step directory to resume from, or None. ``resume`` is 'none', 'auto' or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_step_dir(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    if os.path.isfile(os.path.join(path, "latest")):
        return latest_step_dir(path)
    raise CheckpointError(f"checkpoint.resume={resume}: not a checkpoint (no manifest.json or latest); "
                          "pass a run's checkpoint dir, a step_XXXXXXXX dir, 'auto' or 'none'")


def commit(tmp_dir: str, final_dir: str, ckpt_dir: str, *, keep_last: int) -> None:
    """Publish a fully written step: rename into place, then point ``latest`` at it, then rotate."""
    fsync_dir(tmp_dir)
    if os.path.isdir(final_dir):  # re-saving the same step (e.g. a resumed run's final save)
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(ckpt_dir)
    atomic_write_text(os.path.join(ckpt_dir, "latest"), os.path.basename(final_dir))
    rotate(ckpt_dir, keep_last=keep_last, newest=os.path.basename(final_dir))


def rotate(ckpt_dir: str, *, keep_last: int, newest: str) -> None:
    complete = sorted(t for t in os.listdir(ckpt_dir)
                      if _TAG.match(t) and os.path.isfile(os.path.join(ckpt_dir, t, "manifest.json")))
    for tag in complete[:-keep_last]:
        if tag != newest:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    for name in os.listdir(ckpt_dir):  # debris of crashed saves
        if name.startswith(".tmp-step_") and name != f".tmp-{newest}":
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


class CheckpointSource:
    """Full logical tensors (or row ranges) from a checkpoint's files, read without mapping the files."""

    def __init__(self, step_dir: str, manifest: dict | None = None, *, prefix: str = "model"):
        from megatrain.checkpoint.reader import SafetensorsReader
        self.step_dir = step_dir
        self.manifest = manifest or read_manifest(step_dir)
        self.where: dict[str, str] = {}
        for fname, entry in self.manifest["files"].items():
            if fname.startswith(prefix):
                for name in entry["tensors"]:
                    self.where[name] = fname
        self._open = {f: SafetensorsReader(os.path.join(step_dir, f)) for f in set(self.where.values())}

    def has(self, name: str) -> bool:
        return name in self.where

    def _reader(self, name: str):
        if name not in self.where:
            raise CheckpointError(f"checkpoint {self.step_dir} has no tensor {name!r}; it was written for a "
                                  "different model (check model.* against its manifest)")
        return self._open[self.where[name]]

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        reader = self._reader(name)
        if shape is not None and reader.shape(name) != tuple(shape):
            raise CheckpointError(f"checkpoint {self.step_dir}: tensor {name!r} has shape {reader.shape(name)}, the "
                                  f"model expects {tuple(shape)}; the config's model sizes differ from the checkpoint's")
        return reader.read(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the first dimension (fewer at the end of the tensor)."""
        return self._reader(name).read(name, rows=(start, stop))
