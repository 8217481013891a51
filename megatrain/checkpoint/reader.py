"""A safetensors reader that copies exactly the bytes asked for (no mmap).

safetensors' own loader maps whole files: every page a rank touches stays resident (and counts in its
RSS) while the file is open, so a tp rank reading its slice of a large matrix maps all of it. Reading with
``readinto`` at the tensor's offset keeps a rank's memory to what it keeps plus one transient tensor, and
dim-0 shards (column-parallel weights, vocabulary rows) read only their own rows.
"""
from __future__ import annotations

import json
import os
import struct

import torch
from megatrain.errors import CheckpointError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsReader:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else size
            if n > size - 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header); re-save it with "
                                  "safetensors")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.header = header

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read_with_crc(self, name: str) -> tuple[torch.Tensor, int]:
        """(the whole tensor, crc32 of its bytes), checksummed while it is read: one pass over the file."""
        from megatrain.checkpoint.store import _chunks, crc32_streamed
        out, (start, stop) = self._empty(name), self.header[name]["data_offsets"]
        if not out.numel():
            return out, 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            crc = crc32_streamed(_chunks(memoryview(out.reshape(-1).view(torch.uint8).numpy())),
                                 lambda chunk: self._fill(f, chunk, name))
        return out, crc

    def crc(self, name: str) -> int:
        """crc32 of a tensor's bytes, streamed through one reused buffer (nothing kept)."""
        import zlib
        start, stop = self.header[name]["data_offsets"]
        buf, crc = memoryview(bytearray(min(stop - start, 8 << 20))), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            left = stop - start
            while left:
                chunk = buf[:min(left, len(buf))]
                self._fill(f, chunk, name)
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        return crc

    def _empty(self, name: str) -> torch.Tensor:
        meta = self.header[name]
        return torch.empty(list(meta["shape"]), dtype=_DTYPES[meta["dtype"]])

    def _fill(self, f, chunk: memoryview, name: str) -> None:
        got = 0
        while got < len(chunk):  # raw reads may return less than asked
            n = f.readinto(chunk[got:])
            if not n:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
            got += n

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of its first dimension, as a fresh CPU tensor."""
        meta = self.header[name]
        dtype, shape = _DTYPES[meta["dtype"]], list(meta["shape"])
        start, stop = meta["data_offsets"]
        if rows is not None:
            row_bytes = (stop - start) // max(shape[0], 1)
            r0, r1 = max(0, min(rows[0], shape[0])), max(0, min(rows[1], shape[0]))
            start, stop, shape[0] = start + r0 * row_bytes, start + r1 * row_bytes, r1 - r0
        out = torch.empty(shape, dtype=dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None  # 0-dim tensors too
        if buf is not None:
            with open(self.path, "rb") as f:
                f.seek(self.base + start)
                if f.readinto(memoryview(buf)) != stop - start:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        return out
