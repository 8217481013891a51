"""Deterministic, resumable global batches: the data position is a pure function of the optimizer step.

Global sample position p = step * global_batch_size + j (j < global_batch_size) maps to epoch
``p // num_samples`` and to ``perm(seed, epoch)[p % num_samples]``. Each epoch visits every sample
exactly once; batches wrap across epoch boundaries; a run restarted at step s draws exactly the
batches an uninterrupted run would have drawn from step s on.
"""
from __future__ import annotations

import numpy as np
from megatrain.errors import DataError


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples <= 0:
            raise DataError(f"num_samples={num_samples}: the dataset is empty; prepare more data or lower data.seq_len")
        if global_batch_size <= 0:
            raise DataError(f"train.global_batch_size={global_batch_size} must be positive")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.consumed_samples = 0  # samples handed out by indices_for_step, i.e. (last step + 1) * G
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """(num_samples,) order of epoch ``epoch``; cached for the two most recent epochs."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def indices_for_step(self, step: int) -> list[int]:
        """The ``global_batch_size`` sample indices of optimizer step ``step`` (0-based)."""
        if step < 0:
            raise DataError(f"step={step} must be >= 0")
        pos = step * self.global_batch_size
        out: list[int] = []
        while len(out) < self.global_batch_size:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(self.global_batch_size - len(out), self.num_samples - offset)
            out.extend(self.permutation(epoch)[offset:offset + take].tolist())
            pos += take
        self.consumed_samples = (step + 1) * self.global_batch_size
        return out

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "epoch": self.epoch,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"data sampler checkpoint has {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}; resume with the same train.seed and prepared data "
                                 "(or start a fresh run)")
        self.consumed_samples = int(state["consumed_samples"])

    @property
    def next_step(self) -> int:
        """First step not yet drawn, from consumed_samples (for a resumed run)."""
        return self.consumed_samples // self.global_batch_size


def rank_slice(indices: list[int], *, dp_rank: int, dp_size: int, micro_batch_size: int,
               micro_step: int) -> list[int]:
    """The micro-batch that data-parallel rank ``dp_rank`` trains on at micro step ``micro_step``.

    Layout: block ``(micro_step * dp_size + dp_rank)`` of size ``micro_batch_size``, so the blocks of all
    ranks and micro steps tile the global batch exactly once.
    """
    per_micro = dp_size * micro_batch_size
    if dp_size <= 0 or micro_batch_size <= 0 or not 0 <= dp_rank < dp_size:
        raise DataError(f"rank_slice: need 0 <= dp_rank={dp_rank} < dp_size={dp_size} and micro_batch_size>0")
    if len(indices) % per_micro:
        raise DataError(f"global batch of {len(indices)} is not divisible by dp_size*micro_batch_size="
                         f"{dp_size}*{micro_batch_size}; make train.global_batch_size a multiple of {per_micro}")
    num_micro = len(indices) // per_micro
    if not 0 <= micro_step < num_micro:
        raise DataError(f"micro_step={micro_step} out of range: the global batch holds {num_micro} micro steps")
    start = (micro_step * dp_size + dp_rank) * micro_batch_size
    return list(indices[start:start + micro_batch_size])


def eval_batch_count(requested: int, num_samples: int, *, micro_batch_size: int, dp_size: int = 1) -> int:
    """Micro-batches per rank for a validation pass: ``train.eval_batches``, or with 0 as many as cover the
    whole split once across the dp ranks (the last batch may be short)."""
    if requested:
        return requested
    return max(1, -(-num_samples // (micro_batch_size * dp_size)))
