"""Memory-mapped token shards: ``<name>.bin`` (raw tokens) + ``<name>.idx`` (document boundaries).

``.idx`` layout (little-endian)::

    magic       8 bytes   b"MTIDX\\x00\\x00\\x01"
    version     uint32    1
    dtype code  uint32    1 = uint16, 2 = uint32
    num_docs    uint64
    num_tokens  uint64
    offsets     uint64[num_docs + 1]   token offset of each document; offsets[-1] == num_tokens

``.bin`` is exactly ``num_tokens * itemsize`` bytes. SFT data adds ``<name>.mask``: one uint8 per token,
1 = the token is a loss target (completion / assistant), 0 = prompt; same length as ``.bin``. The reader checks both sizes, the magic, the version
and the offsets before it maps anything, so a truncated or foreign file raises :class:`CorruptShardError`
naming the file instead of feeding garbage tokens to training.
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from megatrain.errors import DataError

MAGIC = b"MTIDX\x00\x00\x01"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, num_docs, num_tokens
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
_CODES = {v: k for k, v in _DTYPES.items()}


class CorruptShardError(DataError):
    """A shard whose .idx/.bin do not agree; the message names the file and says how to rebuild it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk/page-cache footprint whenever every id fits."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Append documents (1-D int arrays) to ``<prefix>.bin``; ``close()`` writes ``<prefix>.idx``.

    The idx is written last: a crash mid-shard leaves a .bin without an idx, which no reader accepts.
    """

    def __init__(self, prefix: str, dtype: np.dtype, *, with_mask: bool = False):
        """``with_mask``: also write ``<prefix>.mask`` (every ``add`` then takes a per-token mask)."""
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise DataError(f"token dtype {self.dtype} unsupported; use uint16 or uint32")
        self._bin = open(prefix + ".bin", "wb")
        self._offsets = [0]
        self._crc, self._max_id = 0, -1  # recorded in meta.json: the shard is verified against them on reuse
        self._mask = open(prefix + ".mask", "wb") if with_mask else None
        self._mask_crc = 0

    def add(self, tokens, mask=None) -> None:
        """``mask``: (len(tokens),) 0/1 loss-target flags; required with ``with_mask``, refused without."""
        arr = np.asarray(tokens)
        if (mask is None) != (self._mask is None):
            raise ValueError(f"{self.prefix}: a mask is given iff the shard was opened with_mask")
        if mask is not None:
            flags = np.asarray(mask)
            if flags.shape != arr.shape:
                raise DataError(f"{self.prefix}: mask shape {flags.shape} differs from tokens {arr.shape}")
            data = (flags != 0).astype(np.uint8).tobytes()
            self._mask.write(data)
            self._mask_crc = zlib.crc32(data, self._mask_crc)
        if arr.ndim != 1:
            raise DataError(f"a document must be a 1-D token array, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise DataError(f"token ids out of range for {self.dtype} in {self.prefix}.bin; use a uint32 shard")
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        if arr.size:
            self._max_id = max(self._max_id, int(arr.max()))
        self._offsets.append(self._offsets[-1] + int(arr.size))

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        if self._mask is not None:
            self._mask.flush()
            os.fsync(self._mask.fileno())
            self._mask.close()
        header = _HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self.num_docs, self.num_tokens)
        idx = header + np.asarray(self._offsets, dtype="<u8").tobytes()
        _fsync_write(self.prefix + ".idx", idx)
        self.record = {"bin_crc32": self._crc, "idx_crc32": zlib.crc32(idx), "max_id": self._max_id}
        if self._mask is not None:
            self.record["mask_crc32"] = self._mask_crc


class ShardReader:
    """Validated read-only view of one shard: ``tokens`` (np.memmap, (num_tokens,)), ``offsets`` and ``mask``
    ((num_tokens,) uint8 when ``<prefix>.mask`` exists, else None)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        fix = "; delete the data directory and run launch/prepare.py again (or pass --force)"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise CorruptShardError(f"shard file {p} is missing{fix}")
        with open(idx_path, "rb") as f:
            raw = f.read()
        if len(raw) < _HEADER.size:
            raise CorruptShardError(f"{idx_path}: truncated header ({len(raw)} bytes){fix}")
        magic, version, code, num_docs, num_tokens = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise CorruptShardError(f"{idx_path}: bad magic {magic!r}, not a megatrain shard index{fix}")
        if version != VERSION:
            raise CorruptShardError(f"{idx_path}: index version {version}, this megatrain reads {VERSION}{fix}")
        if code not in _DTYPES:
            raise CorruptShardError(f"{idx_path}: unknown token dtype code {code}{fix}")
        expect = _HEADER.size + 8 * (num_docs + 1)
        if len(raw) != expect:
            raise CorruptShardError(f"{idx_path}: {len(raw)} bytes, header implies {expect} (truncated?){fix}")
        offsets = np.frombuffer(raw, dtype="<u8", offset=_HEADER.size).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
            raise CorruptShardError(f"{idx_path}: document offsets are inconsistent{fix}")
        self.dtype = _DTYPES[code]
        bin_size = os.path.getsize(bin_path)
        if bin_size != num_tokens * self.dtype.itemsize:
            raise CorruptShardError(f"{bin_path}: {bin_size} bytes but {idx_path} records {num_tokens} "
                                    f"{self.dtype.name} tokens ({num_tokens * self.dtype.itemsize} bytes){fix}")
        self.offsets = offsets  # (num_docs + 1,)
        self.num_docs = int(num_docs)
        self.num_tokens = int(num_tokens)
        # np.memmap cannot map an empty file; an empty shard is an empty array.
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, dtype=self.dtype))
        self.mask = None
        mask_path = prefix + ".mask"
        if os.path.isfile(mask_path):
            if os.path.getsize(mask_path) != num_tokens:
                raise CorruptShardError(f"{mask_path}: {os.path.getsize(mask_path)} bytes but {idx_path} records "
                                        f"{num_tokens} tokens (one mask byte each){fix}")
            self.mask = (np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(self.num_tokens,))
                         if self.num_tokens else np.zeros(0, dtype=np.uint8))

    def document(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.prefix} ({self.num_docs} documents)")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return self.num_docs


def file_crc32(path: str, chunk: int = 64 << 20) -> int:
    """CRC-32 of a file, streamed (zlib runs at GB/s: a 1 GB shard costs about a second)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """Largest id of a (memory-mapped) token array, read in chunks; -1 when empty."""
    best = -1
    for start in range(0, tokens.size, chunk):
        best = max(best, int(tokens[start:start + chunk].max()))
    return best
