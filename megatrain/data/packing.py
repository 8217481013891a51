"""Whole-document rows: ``DocumentPackedDataset`` for ``data.packing: documents`` and ``none``.

``documents``: the split's documents, in order, are packed greedily into rows of T = seq_len tokens (next fit: a
document that does not fit in the current row starts the next one). ``none``: one document per row. A document
longer than T is truncated to its first T tokens (counted, one warning per split).

A row returns, all (T,) int64:

- ``input_ids``: the documents' tokens, then padding (``pad_id``, else ``eos_id``);
- ``labels``: the next token of the same document; -100 at every document's last token (no label crosses a
  boundary), where the next token is not a target (a prompt token, unless ``train_on_prompt``) and on padding;
- ``positions``: 0, 1, ... restarting at each document (padding counts on as one more document);
- ``segments``: the document's index within the row (padding takes the next index: its own segment).

The plan (which documents go in which row) depends only on the document lengths and T. It is computed once and
cached in the data dir as ``packing/<split>-T<seq_len>.npy`` (written to a temp file and renamed), so sample i is
the same row in every process and after every resume.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import numpy as np
import torch

from megatrain.data.dataset import PackedTokenDataset
from megatrain.errors import DataError

log = logging.getLogger("megatrain.data")

PACKINGS = ("stream", "documents", "none")


def pack_documents(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """(num_rows + 1,) int64 row boundaries into the document list: row r holds documents
    ``bounds[r]:bounds[r+1]``. Next fit in document order over lengths capped at ``seq_len``."""
    bounds, fill = [0], 0
    for i, n in enumerate(np.minimum(np.asarray(lengths, dtype=np.int64), seq_len).tolist()):
        if fill and fill + n > seq_len:
            bounds.append(i)
            fill = 0
        fill += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


class DocumentPackedDataset(PackedTokenDataset):
    def __init__(self, path: str, split: str, seq_len: int, *, packing: str = "documents",
                 train_on_prompt: bool = False, vocab_size: int | None = None, verify_checksums: bool = True):
        if packing not in ("documents", "none"):
            raise DataError(f"data.packing={packing!r}: DocumentPackedDataset packs 'documents' or 'none'")
        self.packing = packing
        super().__init__(path, split, seq_len, vocab_size=vocab_size, verify_checksums=verify_checksums,
                         train_on_prompt=train_on_prompt)

    def _plan_samples(self) -> None:
        pad = self.meta.get("pad_id")
        self.pad_id = int(pad) if isinstance(pad, int) and not isinstance(pad, bool) else self.eos_id
        # global token offset of every document of the split: shards hold whole documents
        parts = [s.offsets[:-1] + int(base) for s, base in zip(self._shards, self._starts[:-1])]
        self._doc_offsets = np.concatenate(parts + [self._starts[-1:]]).astype(np.int64)  # (num_docs + 1,)
        lengths = np.diff(self._doc_offsets)
        self.num_docs = int(lengths.size)
        if self.num_docs == 0:
            raise DataError(f"split '{self.split}' of {self.path} holds no documents; add data"
                            + (" or raise data.val_fraction" if self.split == "val" else ""))
        self.num_truncated = int((lengths > self.seq_len).sum())
        if self.num_truncated:
            log.warning("%d of %d documents of split '%s' are longer than data.seq_len=%d and are truncated to it; "
                        "raise data.seq_len to keep them whole", self.num_truncated, self.num_docs, self.split,
                        self.seq_len)
        if self.packing == "none":
            self._rows = np.arange(self.num_docs + 1, dtype=np.int64)
        else:
            self._rows = self._cached_plan(lengths)
        self.num_samples = int(self._rows.size - 1)

    def _plan_path(self) -> str:
        return os.path.join(self.path, "packing", f"{self.split}-T{self.seq_len}.npy")

    def _cached_plan(self, lengths: np.ndarray) -> np.ndarray:
        path = self._plan_path()
        if os.path.isfile(path):
            try:
                rows = np.load(path, allow_pickle=False)
                if (rows.ndim == 1 and rows.dtype == np.int64 and rows.size >= 2 and rows[0] == 0
                        and rows[-1] == lengths.size and np.all(np.diff(rows) > 0)):
                    return rows
            except (OSError, ValueError):
                pass
            log.warning("%s is not a packing plan of this split; computing it again", path)
        rows = pack_documents(lengths, self.seq_len)
        try:  # temp file + rename: concurrent ranks write the same bytes, readers never see half a file
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, rows)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        except OSError as err:  # a read-only data dir: the plan is deterministic, recomputing it is only slower
            log.info("cannot cache the packing plan in %s (%s); computed in memory", path, err.strerror)
        return rows

    def row_documents(self, i: int) -> range:
        """Split-wide indices of the documents in row ``i``."""
        return range(int(self._rows[i]), int(self._rows[i + 1]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for split '{self.split}' ({self.num_samples} samples)")
        T = self.seq_len
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, -100, dtype=np.int64)
        positions = np.zeros(T, dtype=np.int64)
        segments = np.zeros(T, dtype=np.int64)
        pos, docs = 0, self.row_documents(i)
        for k, d in enumerate(docs):
            start = int(self._doc_offsets[d])
            n = min(int(self._doc_offsets[d + 1]) - start, T - pos)
            tokens = self.window(start, n)  # (n,)
            input_ids[pos:pos + n] = tokens
            # position t predicts token t+1 of the same document; its last token predicts nothing
            labels[pos:pos + n - 1] = np.where(self.targets(start + 1, n - 1), tokens[1:], -100)
            positions[pos:pos + n] = np.arange(n)
            segments[pos:pos + n] = k
            pos += n
        positions[pos:] = np.arange(T - pos)
        segments[pos:] = len(docs)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "positions": torch.from_numpy(positions), "segments": torch.from_numpy(segments)}
