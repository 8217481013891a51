"""Precomputed top-k teacher targets on disk: written once by a teacher pass, streamed back by np.memmap.

Layout of a cache directory (``distill.teacher_cache``)::

    manifest.json                  written last (atomically): a directory without it is not a cache
    s00000.ids.bin                 int32   (n, T, k)  top-k token ids, most likely first
    s00000.logp.bin                fp16|fp32 (n, T, k) their log-probabilities at the temperature T
    s00000.tail.bin                fp32    (n, T)     log of the remaining mass, log Σ_{j∉K} p_j (−inf if k = V)
    s00001.* ...                   shards of ``shard_samples`` consecutive dataset samples

Entry (sample i, position t) holds the teacher's distribution for the token after ``input_ids[t]`` of sample i
of the LM training dataset — the exact windows ``PackedTokenDataset`` yields, by sample index. Only the first
``num_samples`` samples may be cached (``distill.cache_samples``); training then draws from those.

Log-probabilities (not raw logits) are stored because the KL needs them and their precision matters near 0
(likely tokens), where fp16 is finest: |error| ≤ 2^-11·|log p|. The tail log-mass is fp32 and is computed
exactly by a log-sum-exp over the other tokens. The manifest names the teacher (path, config and a CRC of its
weights), the data (path, split, seq_len, sample count, a CRC of the cached tokens), vocab_size, k and T; a
reader checks every one against its config and says which field differs and how to fix it.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
import torch

from megatrain.fsutil import atomic_write_text, fsync_dir
from megatrain.errors import UserError

FORMAT, VERSION, MANIFEST = "megatrain-teacher-topk", 1, "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
SHARD_BYTES = 256 << 20  # default shard size: large sequential files, few of them


def tensor_crc(model: torch.nn.Module) -> str:
    """CRC-32 over a model's state (names and fp32 values, in order): identifies the teacher's weights."""
    crc = 0
    for name, t in model.state_dict().items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.detach().float().cpu().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def dataset_identity(dataset, num_samples: int) -> dict:
    """What a cache was computed on: the split, the windowing and a CRC of the tokens of the cached samples."""
    crc, end = 0, num_samples * dataset.seq_len + 1  # samples [0, n) read stream[0 : n·T + 1]
    for start in range(0, end, 1 << 22):  # bounded memory on large corpora
        crc = zlib.crc32(dataset.window(start, min(1 << 22, end - start)).astype(np.int32).tobytes(), crc)
    return {"path": dataset.path, "split": dataset.split, "seq_len": dataset.seq_len,
            "dataset_samples": len(dataset), "num_samples": num_samples, "tokens_crc32": f"{crc:08x}"}


def _shard_files(prefix: str) -> dict[str, str]:
    return {part: f"{prefix}.{part}.bin" for part in ("ids", "logp", "tail")}


class _ShardWriter:
    """Appends (B, T, ...) blocks to one shard's three files; committed by rename after fsync."""

    def __init__(self, out_dir: str, prefix: str, value_dtype):
        self.out_dir, self.files, self.value_dtype = out_dir, _shard_files(prefix), value_dtype
        self.handles = {part: open(self._tmp(name), "wb") for part, name in self.files.items()}

    def _tmp(self, name: str) -> str:
        return os.path.join(self.out_dir, f".{name}.tmp.{os.getpid()}")

    def write(self, ids: torch.Tensor, logp: torch.Tensor, tail: torch.Tensor) -> None:
        self.handles["ids"].write(ids.to(torch.int32).cpu().numpy().tobytes())
        self.handles["logp"].write(logp.float().cpu().numpy().astype(self.value_dtype).tobytes())
        self.handles["tail"].write(tail.float().cpu().numpy().tobytes())

    def commit(self) -> None:
        for part, f in self.handles.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self._tmp(self.files[part]), os.path.join(self.out_dir, self.files[part]))
        fsync_dir(self.out_dir)


@torch.no_grad()
def write_teacher_cache(out_dir: str, teacher: torch.nn.Module, dataset, *, k: int, temperature: float,
                        vocab_size: int, value_dtype: str = "float16", num_samples: int | None = None,
                        micro_batch_size: int = 8, shard_samples: int | None = None, rank: int = 0, world: int = 1,
                        teacher_info: dict | None = None, device=None, log=print) -> dict | None:
    """Run the frozen ``teacher`` over samples [0, num_samples) of ``dataset`` and write the shards this rank owns
    (shard s is written by rank s mod world). Returns the manifest; the caller's rank 0 writes it with
    ``write_manifest`` once every rank has finished (a barrier), so the manifest appears last."""
    from megatrain.compress.sparse_kl import topk_targets
    n = len(dataset) if num_samples is None else num_samples
    if not 0 < n <= len(dataset):
        raise UserError(f"distill.cache_samples={num_samples} but the training split has {len(dataset)} samples "
                         f"of seq_len={dataset.seq_len}; use 1..{len(dataset)} or leave it unset (all)")
    if not 0 < k <= vocab_size:
        raise UserError(f"distill.cache_topk={k} must be in 1..vocab_size={vocab_size}")
    seq = dataset.seq_len
    per_sample = seq * (k * (4 + np.dtype(DTYPES[value_dtype]).itemsize) + 4)
    shard_samples = shard_samples or max(1, SHARD_BYTES // per_sample)
    starts = list(range(0, n, shard_samples))
    shards = [{"prefix": f"s{i:05d}", "start": s, "num_samples": min(shard_samples, n - s)} for i, s in enumerate(starts)]
    os.makedirs(out_dir, exist_ok=True)
    device = device or next(teacher.parameters()).device
    teacher.eval()
    for i, shard in enumerate(shards):
        if i % world != rank:
            continue
        writer = _ShardWriter(out_dir, shard["prefix"], DTYPES[value_dtype])
        stop = shard["start"] + shard["num_samples"]
        for b in range(shard["start"], stop, micro_batch_size):
            ids = torch.stack([dataset[j]["input_ids"] for j in range(b, min(b + micro_batch_size, stop))])  # (B, T)
            logits = teacher(ids.to(device))[..., :vocab_size]  # (B, T, V)
            top_ids, top_logp, tail = topk_targets(logits.reshape(-1, vocab_size), k=k, temperature=temperature)
            writer.write(top_ids, top_logp, tail)  # row-major (B·T, k) = (B, T, k) on disk
        writer.commit()
        log(f"teacher cache: shard {i + 1}/{len(shards)} ({shard['num_samples']} samples) written by rank {rank}")
    return {"format": FORMAT, "version": VERSION, "vocab_size": vocab_size, "k": k, "temperature": temperature,
            "value_dtype": value_dtype, "seq_len": seq, "num_samples": n, "shard_samples": shard_samples,
            "teacher": teacher_info or {}, "data": dataset_identity(dataset, n), "shards": shards}


def write_manifest(out_dir: str, manifest: dict) -> str:
    path = os.path.join(out_dir, MANIFEST)
    atomic_write_text(path, json.dumps(manifest, indent=1))
    return path


class TeacherCache:
    """Read side: per-sample top-k targets from memory-mapped shards (pages load as samples are read)."""

    def __init__(self, path: str):
        self.path = path
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise UserError(f"distill.teacher_cache={path} has no {MANIFEST} (not a teacher cache, or its writing did "
                             "not finish); write it with launch/cache_teacher.py")
        from megatrain.safe_io import read_json
        self.manifest = m = read_json(mpath, what=f"distill.teacher_cache={path}: manifest",
                                      fix="write the cache again with launch/cache_teacher.py")
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise UserError(f"distill.teacher_cache={path}: format {m.get('format')!r} v{m.get('version')} is not "
                             f"{FORMAT} v{VERSION}; rewrite it with launch/cache_teacher.py")
        need = ("k", "seq_len", "num_samples", "value_dtype", "shard_samples", "shards", "vocab_size")
        bad = [key for key in need if key not in m] or ([] if m["value_dtype"] in DTYPES else ["value_dtype"])
        if bad or not isinstance(m["shards"], list):
            raise UserError(f"distill.teacher_cache={path}: manifest field {(bad or ['shards'])[0]!r} missing or "
                            "invalid; write the cache again with launch/cache_teacher.py")
        self.k, self.seq_len, self.num_samples = int(m["k"]), int(m["seq_len"]), int(m["num_samples"])
        self.value_dtype = DTYPES[m["value_dtype"]]
        self._shard_samples = int(m["shard_samples"])
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        for shard in m["shards"]:  # a truncated shard fails here, not as garbage targets mid-training
            rows = shard["num_samples"] * self.seq_len
            for part, name in _shard_files(shard["prefix"]).items():
                want = rows * {"ids": 4 * self.k, "logp": self.value_dtype().itemsize * self.k, "tail": 4}[part]
                fpath = os.path.join(path, name)
                have = os.path.getsize(fpath) if os.path.isfile(fpath) else -1
                if have != want:
                    raise UserError(f"distill.teacher_cache={path}: {name} has {have} bytes, the manifest needs "
                                     f"{want}; the cache is incomplete or corrupt - write it again")

    def check(self, *, vocab_size: int, seq_len: int, temperature: float, k: int | None, data: dict,
              teacher_crc: str | None = None) -> None:
        """One-line ValueError naming the first field that differs from the run's config, and the fix."""
        m, p = self.manifest, f"distill.teacher_cache={self.path}"
        rebuild = "or rebuild the cache with launch/cache_teacher.py"
        if m["vocab_size"] != vocab_size:
            raise UserError(f"{p} holds vocab_size={m['vocab_size']} but model.vocab_size={vocab_size}; use data "
                             f"tokenized like the teacher's, {rebuild}")
        if m["seq_len"] != seq_len:
            raise UserError(f"{p} was written with data.seq_len={m['seq_len']} but the config has {seq_len}; set "
                             f"data.seq_len={m['seq_len']} {rebuild}")
        if k is not None and m["k"] != k:
            raise UserError(f"{p} holds k={m['k']} logits per position but distill.cache_topk={k}; set "
                             f"distill.cache_topk={m['k']} (or leave it unset) {rebuild}")
        if abs(m["temperature"] - temperature) > 1e-9:
            raise UserError(f"{p} was written at temperature {m['temperature']} but distill.temperature="
                             f"{temperature}; set distill.temperature={m['temperature']} {rebuild}")
        saved = m["data"]
        if saved["dataset_samples"] != data["dataset_samples"] or saved["split"] != data["split"]:
            raise UserError(f"{p} was written for {saved['dataset_samples']} '{saved['split']}' samples of "
                             f"{saved['path']} but data.path={data['path']} yields {data['dataset_samples']}; point "
                             f"data.path at the cached data {rebuild}")
        if saved["tokens_crc32"] != data["tokens_crc32"]:
            raise UserError(f"{p}: the tokens of data.path={data['path']} differ from the cached ones (CRC "
                             f"{data['tokens_crc32']} vs {saved['tokens_crc32']}); point data.path at the cached "
                             f"data {rebuild}")
        have = m.get("teacher", {}).get("weights_crc32")
        if teacher_crc is not None and have is not None and have != teacher_crc:
            raise UserError(f"{p} was computed from teacher {m['teacher'].get('path')} (weights CRC {have}) but "
                             f"distill.teacher has CRC {teacher_crc}; point distill.teacher at the cached teacher, "
                             f"unset it, {rebuild}")

    def __len__(self) -> int:
        return self.num_samples

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._maps:
            shard = self.manifest["shards"][s]
            shape = (shard["num_samples"], self.seq_len)
            files = _shard_files(shard["prefix"])
            self._maps[s] = {
                "ids": np.memmap(os.path.join(self.path, files["ids"]), np.int32, "r", shape=(*shape, self.k)),
                "logp": np.memmap(os.path.join(self.path, files["logp"]), self.value_dtype, "r", shape=(*shape, self.k)),
                "tail": np.memmap(os.path.join(self.path, files["tail"]), np.float32, "r", shape=shape)}
        return self._maps[s]

    def targets(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i's targets: teacher_ids (T, k) int32, teacher_logp (T, k) fp32, teacher_tail (T,) fp32."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} is not in the teacher cache ({self.num_samples} samples)")
        s, j = divmod(i, self._shard_samples)
        maps = self._shard(s)
        return {"teacher_ids": torch.from_numpy(np.array(maps["ids"][j])),  # copies: torch needs writable memory
                "teacher_logp": torch.from_numpy(maps["logp"][j].astype(np.float32)),
                "teacher_tail": torch.from_numpy(np.array(maps["tail"][j]))}

    # Pickling (DataLoader workers) ships the path; the maps are reopened on first use.
    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}


class CachedTargetsDataset(torch.utils.data.Dataset):
    """The LM training samples [0, len(cache)) with the teacher's cached targets added to each item."""

    def __init__(self, base, cache: TeacherCache):
        self.base, self.cache = base, cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[i], **self.cache.targets(i)}
