"""``PackedTokenDataset``: fixed-length next-token samples cut from one split of a prepared data dir.

The split's documents, each already followed by EOS in the shards, form one token stream of N tokens.
Sample i is the window ``stream[i*T : i*T + T + 1]`` (T = seq_len): ``input_ids`` its first T tokens,
``labels`` its last T. Windows share one boundary token, so every token but the first is a label exactly
once, and there are ``(N - 1) // T`` samples. Reads are zero-copy slices of the memory-mapped shards.

On SFT data (shards with a loss mask, see megatrain/data/chat.py) a label whose token is not a target (a prompt
token) is -100 unless ``train_on_prompt``. Whole-document rows (``data.packing: documents|none``) are
megatrain/data/packing.py.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from megatrain.data.indexed import ShardReader
from megatrain.data.prepared import check_tokenizer_vocab, read_meta, verify_shards
from megatrain.errors import DataError


class PackedTokenDataset(torch.utils.data.Dataset):
    def __init__(self, path: str, split: str, seq_len: int, *, vocab_size: int | None = None,
                 verify_checksums: bool = True, train_on_prompt: bool = False):
        """``vocab_size``: the model's; every shard's largest token id is checked against it once.
        ``verify_checksums``: CRC-32 of each shard against meta.json on first open (data.verify_checksums).
        ``train_on_prompt``: on SFT data, prompt tokens are labels too (data.train_on_prompt)."""
        if seq_len <= 0:
            raise DataError(f"data.seq_len={seq_len} must be positive")
        self.path = os.path.abspath(os.path.expanduser(path))
        self.meta = read_meta(self.path)
        if split not in self.meta["splits"]:
            raise DataError(f"split {split!r} not in {self.path} (has {sorted(self.meta['splits'])})")
        self.split = split
        self.seq_len = seq_len
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        self.has_mask = bool(self.meta.get("loss_mask"))
        self.train_on_prompt = train_on_prompt
        self._shard_names = list(self.meta["splits"][split]["shards"])
        verify_shards(self.path, {"splits": {split: self.meta["splits"][split]}}, checksums=verify_checksums)
        check_tokenizer_vocab(self.path, self.meta)
        self._open()
        if vocab_size is not None:
            self.check_vocab(vocab_size, trust_record=verify_checksums)
        self.num_tokens = int(self._starts[-1])
        self._plan_samples()

    def _plan_samples(self) -> None:
        split, seq_len = self.split, self.seq_len
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise DataError(
                f"split '{split}' of {self.path} has {self.num_tokens} tokens, fewer than one sample of "
                f"seq_len+1={seq_len + 1}; lower data.seq_len, add data (data.max_bytes/sources)"
                + (" or raise data.val_fraction" if split == "val" else ""))

    def _open(self) -> None:
        # Shards are validated (sizes, magic, offsets) on open: a truncated one raises CorruptShardError.
        self._shards = [ShardReader(os.path.join(self.path, name)) for name in self._shard_names]
        sizes = [s.num_tokens for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (num_shards + 1,)
        if int(self._starts[-1]) != int(self.meta["splits"][self.split]["num_tokens"]):
            raise DataError(f"{self.path}: shards of split '{self.split}' hold {int(self._starts[-1])} tokens but "
                             f"meta.json records {self.meta['splits'][self.split]['num_tokens']}; prepare again with --force")
        if self.has_mask and any(s.mask is None for s in self._shards):
            missing = next(s.prefix for s in self._shards if s.mask is None)
            raise DataError(f"{missing}.mask is missing but {self.path}/meta.json records a loss mask; prepare again "
                            "with --data.force_prepare=true")

    def check_vocab(self, vocab_size: int, *, trust_record: bool = True) -> None:
        """Every token id below ``vocab_size`` (an out-of-range id would index past the embedding at step 1).
        Uses the largest id prepare recorded when the shard's checksum was verified, else reads the shard."""
        from megatrain.data.indexed import max_token_id
        records = self.meta["splits"][self.split].get("checksums") or {}
        for name, shard in zip(self._shard_names, self._shards):
            record = records.get(name) if isinstance(records, dict) else None
            top = (record["max_id"] if trust_record and isinstance(record, dict) and isinstance(record.get("max_id"), int)
                   else max_token_id(shard.tokens))
            if top >= vocab_size:
                raise DataError(f"shard {shard.prefix}.bin holds token id {top} but model.vocab_size={vocab_size}; "
                                f"set model.vocab_size >= {top + 1} (0 = take it from the data) or use data "
                                "prepared with the model's tokenizer")

    def __len__(self) -> int:
        return self.num_samples

    def window(self, start: int, length: int, *, field: str = "tokens") -> np.ndarray:
        """``stream[start:start+length]`` as int64, (length,), gathered across shard boundaries; ``field="mask"``
        reads the loss-mask stream instead of the tokens."""
        parts, pos, end = [], start, start + length
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < end:
            shard, base = self._shards[k], int(self._starts[k])
            stop = min(end, int(self._starts[k + 1]))
            parts.append(getattr(shard, field)[pos - base:stop - base])
            pos, k = stop, k + 1
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.astype(np.int64)  # copies out of the read-only map; torch needs a writable buffer

    def targets(self, start: int, length: int) -> np.ndarray:
        """(length,) bool: which tokens of ``stream[start:start+length]`` may be labels."""
        if not self.has_mask or self.train_on_prompt:
            return np.ones(length, dtype=bool)
        return self.window(start, length, field="mask").astype(bool)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for split '{self.split}' ({self.num_samples} samples)")
        start = i * self.seq_len
        tokens = torch.from_numpy(self.window(start, self.seq_len + 1))  # (T + 1,)
        labels = tokens[1:].clone()  # (T,)
        if self.has_mask and not self.train_on_prompt:
            labels[~torch.from_numpy(self.targets(start + 1, self.seq_len))] = -100
        return {"input_ids": tokens[:-1], "labels": labels}  # (T,), (T,)

    # Pickling (DataLoader workers under spawn) ships the path, not the mapped pages; reopened on arrival.
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_shards", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()
