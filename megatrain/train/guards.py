"""The trainer's run-time guards in one place: preemption flag, non-finite guard, run-directory lock.

Per step, each rank's flags (signal received, non-finite seen) ride in the statistics it already all-reduces
once per step (``fold`` / ``unfold``), so every rank learns of a signal or a NaN on any rank after the same
step with no extra synchronisation. Only when that reduction does not span the world (tp > 1: it runs over
the data-parallel group; pp > 1: the pipeline engine reduces the loss itself) are the two flags all-reduced
over the world separately, still once per step.
"""
from __future__ import annotations

import atexit

import torch
from megatrain.distributed import host_collectives as hc

from megatrain.train.nonfinite import NonFinitePolicy, guard_optimizer, local_nonfinite
from megatrain.train.preemption import Preemption

PREEMPT, NONFINITE = "_guard_preempt", "_guard_nonfinite"


class RunGuards:
    def __init__(self, cfg, *, rank: int):
        self.rank = rank
        self.preemption = Preemption(list(cfg.checkpoint.preempt_signals), rank=rank)
        self.policy = NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_nonfinite_skips)
        self._guard = {"skipped": 0}
        self.preempt = False  # agreed: some rank was signalled
        self.nonfinite = False  # agreed: the last step was non-finite somewhere
        self.lock = None

    def take_lock(self, dirs: dict[str, str]) -> None:
        """Rank 0 locks the run directories; every rank raises the same one-line refusal."""
        from megatrain.errors import ConfigError
        from megatrain.train.run_lock import RunLock
        error = ""
        if self.rank == 0:
            try:
                self.lock = RunLock(dirs)
                atexit.register(self.lock.release)
            except ConfigError as err:
                error = str(err)
        error = hc.broadcast_object(error, src=0)
        if error:
            raise ConfigError(error)

    def attach(self, engine) -> None:
        from megatrain.checkpoint.engine_state import inner_optimizer
        self._guard = guard_optimizer(inner_optimizer(engine))

    def fold(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flag = local_nonfinite(totals, self._guard)  # on the statistics' device: they are reduced in one tensor
        totals[NONFINITE] = flag
        totals[PREEMPT] = torch.full_like(flag, 1.0 if self.preemption.requested else 0.0)
        return totals

    def unfold(self, totals: dict[str, torch.Tensor], *, spans_world: bool) -> dict[str, torch.Tensor]:
        flags = torch.stack([totals.pop(NONFINITE).double(), totals.pop(PREEMPT).double()])
        if not spans_world:
            flags = hc.all_reduce(flags)  # staged on the group's device (NCCL: CUDA) and back
        self.nonfinite = bool(flags[0] > 0) or any(not bool(torch.isfinite(v).all()) for v in totals.values())
        self.preempt = self.preempt or bool(flags[1] > 0)
        return totals

    def after_pipeline_step(self, loss: torch.Tensor) -> None:
        self.unfold(self.fold({"loss": loss}), spans_world=False)

    def close(self) -> None:
        self.preemption.close()
        if self.lock is not None:
            self.lock.release()
