"""Non-finite guard: a step whose loss or gradients are not finite is never applied, on every rank alike.

Gradients are reduced over data parallel before the optimizer runs, so a NaN on one rank reaches every rank's
gradients (or partition of them) before ``optimizer.step``; the guard wraps the inner torch optimizer's step
and leaves the weights and moments untouched when any local gradient is non-finite (DeepSpeed's own overflow
check already skips such a step under fp16/ZeRO). Whether a step was non-finite anywhere is then agreed
through the once-per-step statistics reduction (see trainer), and ``NonFinitePolicy`` decides what follows.
"""
from __future__ import annotations

import torch

from megatrain.errors import UserError


class NonFiniteError(UserError):
    """Training stopped on non-finite values; one line naming the step and what to change."""


def guard_optimizer(inner: torch.optim.Optimizer) -> dict:
    """Wrap ``inner.step`` so that it skips when a gradient is non-finite; returns the state dict it updates
    (``skipped``: steps skipped on this rank since the last ``take``)."""
    import functools
    state = {"skipped": 0}
    step = inner.step

    @functools.wraps(step)  # keeps the LR scheduler's marker on the wrapped step (else it warns every step)
    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            # one fused norm per device; inf/nan anywhere make the sum non-finite (a local check, no collective)
            norms = torch._foreach_norm(grads)
            if not torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]).sum()):
                state["skipped"] += 1
                return None
        return step(*args, **kwargs)

    inner.step = guarded_step
    return state


def local_nonfinite(stats: dict[str, torch.Tensor], guard: dict) -> torch.Tensor:
    """> 0 if this rank saw a non-finite statistic or skipped its optimizer step in this step: a 0-dim tensor on the
    statistics' device, computed without a host sync (the step's one sync is the statistics reduction)."""
    device = next(iter(stats.values())).device
    bad = torch.tensor(float(guard["skipped"] > 0), device=device)
    for v in stats.values():
        bad = bad + (~torch.isfinite(v)).any().float()
    guard["skipped"] = 0
    return bad


class NonFinitePolicy:
    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.consecutive = 0

    def decide(self, step: int, nonfinite: bool, *, last_good: str | None) -> str:
        """'ok', 'skip' or 'rollback' for a step that was (non-)finite; raises NonFiniteError to stop."""
        if not nonfinite:
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        where = f"at step {step}"
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite loss or gradients {where} (train.nonfinite=stop); the step was not "
                                 "applied and nothing was saved. Lower train.lr or raise train.grad_clip, then resume "
                                 f"from {last_good or 'the start'}")
        if self.consecutive > self.max_skips:
            raise NonFiniteError(f"non-finite loss or gradients in {self.consecutive} consecutive steps up to step "
                                 f"{step} (train.nonfinite={self.policy}, train.max_nonfinite_skips={self.max_skips}); "
                                 "no non-finite state was saved. Lower train.lr or raise train.grad_clip, then "
                                 f"resume from {last_good or 'the start'}")
        if self.policy == "rollback" and last_good is None:
            raise NonFiniteError(f"non-finite loss or gradients {where} and train.nonfinite=rollback has no checkpoint "
                                 "to return to; set checkpoint.every, or use train.nonfinite=skip")
        return self.policy


def reload_checkpoint(engine, dims, step_dir: str, model_cfg):
    """Set every local parameter, fp32 master and moment from ``step_dir`` in place (rollback); returns the
    opened checkpoint. ZeRO-3 holds parameters only as partitions and is refused by the trainer beforehand."""
    from megatrain.checkpoint.engine_state import load_optimizer_state, local_parameters
    from megatrain.checkpoint.layout_free import open_resume
    from megatrain.parallelize.param_spec import logical_name
    from megatrain.parallelize.shards import local_shape, shard_of

    res = open_resume(step_dir, model_cfg)
    tp_rank, tp = (dims.tp_rank, dims.tp) if dims is not None else (0, 1)
    with torch.no_grad():
        for p in local_parameters(engine.module):
            value = shard_of(res.model.tensor(logical_name(p)).float(), p, tp_rank, tp).reshape(local_shape(p))
            p.data.copy_(value.to(p.device, p.dtype))
    if res.manifest.get("has_optimizer", True):
        load_optimizer_state(engine, dims, res, step=int(res.manifest["optimizer_step"]))
    return res
