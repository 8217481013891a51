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


# Bytes per write/read call. The crc of chunk i runs on a helper thread while chunk i is written (or chunk
# i+1 read): zlib.crc32 and file I/O both release the GIL, so checksums cost little wall time on >= 2 cores.
_CHUNK = 8 << 20
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_POOL = None


def _crc_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megatrain-crc")
    return _POOL


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def crc32_streamed(chunks, step) -> int:
    """crc32 over ``chunks`` (memoryviews, in order) while ``step(chunk)`` writes each one, or reads into it
    (it must return once the chunk holds its bytes): chunk i's crc runs on the helper thread during chunk
    i+1's I/O, so every byte is touched once while it is still in cache."""
    crc, pending = 0, None
    pool = _crc_pool()
    for chunk in chunks:
        step(chunk)
        if pending is not None:
            crc = pending.result()
        pending = pool.submit(zlib.crc32, chunk, crc)
    return pending.result() if pending is not None else crc


def _chunks(view: memoryview):
    return (view[i:i + _CHUNK] for i in range(0, len(view), _CHUNK))


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write a safetensors file (fsynced) and checksum each tensor in the same pass; returns its manifest entry.

    The layout is safetensors' own (8-byte header length, JSON header padded to 8 bytes, tensors back to back,
    widest dtypes first so every tensor stays aligned): ``safetensors.safe_open`` and HF read it unchanged."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {k!r} has dtype {v.dtype}, which a checkpoint cannot hold")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        v = tensors[k]
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    crcs = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            crcs[k] = crc32_streamed(_chunks(_bytes_of(tensors[k])), f.write)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "crc32": crcs[k]}
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


def check_file(path: str, entry: dict) -> None:
    """Everything but the bytes: the file exists, has the manifest's size, and its header lists every tensor of
    the manifest inside the file. Cheap (one header read); the crc is checked as the tensors are read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, resume from another step")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes, manifest says "
                              f"{entry['bytes']} (truncated or replaced); resume from an earlier step")
    header, base = _header(path)
    for name, meta in entry["tensors"].items():
        if name not in header:
            raise CheckpointError(f"checkpoint file {path} lacks tensor {name!r} listed in the manifest")
        if list(header[name]["shape"]) != list(meta["shape"]) or base + header[name]["data_offsets"][1] > size:
            raise CheckpointError(f"checkpoint file {path}: tensor {name!r} does not match the manifest (shape "
                                  f"{header[name]['shape']} vs {meta['shape']}) or lies past the end; it is corrupt")


def checksum_error(path: str, name: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {path}: tensor {name!r} fails its checksum (corrupt); "
                           "restore the file or resume from an earlier step")


def verify_file(path: str, entry: dict) -> None:
    """Size, header and per-tensor crc32 against the manifest, streaming tensor by tensor (no tensors kept).

    For checking a checkpoint without loading it; loaders verify while reading instead (``CheckpointSource``)."""
    check_file(path, entry)
    header, base = _header(path)
    buf = memoryview(bytearray(_CHUNK))
    with open(path, "rb") as f:
        for name, meta in entry["tensors"].items():
            start, stop = header[name]["data_offsets"]
            f.seek(base + start)
            crc, left = 0, stop - start
            while left:
                got = f.readinto(buf[:min(left, _CHUNK)])
                if not got:
                    raise CheckpointError(f"checkpoint file {path}: tensor {name!r} is truncated")
                crc, left = zlib.crc32(buf[:got], crc), left - got
            if crc != meta["crc32"]:
                raise checksum_error(path, name)


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
    """Full logical tensors (or row ranges) from a checkpoint's files, read without mapping the files.

    ``verify=True``: each file's size and header are checked on open, and each tensor's crc32 is computed
    while it is read (one pass over the file) and compared with the manifest. A row range is not a whole
    tensor, so a partial read checks its tensor's full crc by streaming it once (the first time only)."""

    def __init__(self, step_dir: str, manifest: dict | None = None, *, prefix: str = "model", verify: bool = False):
        from megatrain.checkpoint.reader import SafetensorsReader
        self.step_dir = step_dir
        self.manifest = manifest or read_manifest(step_dir)
        self.verify = verify
        self.where: dict[str, str] = {}
        for fname, entry in self.manifest["files"].items():
            if fname.startswith(prefix):
                if verify:
                    check_file(os.path.join(step_dir, fname), entry)
                for name in entry["tensors"]:
                    self.where[name] = fname
        self._open = {f: SafetensorsReader(os.path.join(step_dir, f)) for f in set(self.where.values())}
        self._verified: set[str] = set()

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
        if not self.verify or name in self._verified:
            return reader.read(name)
        out, crc = reader.read_with_crc(name)
        self._check_crc(name, crc)
        return out

    def _check_crc(self, name: str, crc: int) -> None:
        fname = self.where[name]
        if crc != self.manifest["files"][fname]["tensors"][name]["crc32"]:
            raise checksum_error(os.path.join(self.step_dir, fname), name)
        self._verified.add(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the first dimension (fewer at the end of the tensor)."""
        reader = self._reader(name)
        if self.verify and name not in self._verified:
            if start <= 0 and stop >= reader.shape(name)[0]:
                out, crc = reader.read_with_crc(name)
                self._check_crc(name, crc)
                return out
            self._check_crc(name, reader.crc(name))
        return reader.read(name, rows=(start, stop))
