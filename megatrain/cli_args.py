"""What every launch/ script shares: parsing (``--config FILE`` plus ``--section.key=value``, in
megatrain.config.cli), the one-line exit for user errors, and the bootstrap → Trainer → shutdown sequence."""
from __future__ import annotations

import sys

from megatrain.errors import UserError
from megatrain.config import Config
from megatrain.config.cli import parse  # noqa: F401 (the launchers import it from here)


def fail(err: Exception) -> None:
    """One line on stderr and exit 2 for user errors (no traceback wall for a typo)."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


def run_pass(argv: list[str] | None, description: str, target: str):
    """The whole body of a launcher that runs one pass: parse, then call ``target`` ("module:function", imported
    only after parsing so a config error answers at once) as ``fn(cfg, local_rank=...)``; user errors
    (megatrain.errors.UserError) become one line and exit 2; anything else keeps its traceback."""
    import importlib
    cfg, _, local_rank = parse(argv, description=description)
    module, name = target.split(":")
    try:
        result = getattr(importlib.import_module(module), name)(cfg, local_rank=local_rank)
    except UserError as err:
        fail(err)
    from megatrain.distributed.env import shutdown_distributed
    shutdown_distributed()
    return result


def run_training(cfg: Config, local_rank: int | None):
    """Build the Trainer (a bad config, layout or checkpoint is one line and exit 2) and run it. A run stopped
    on non-finite values or a failed save is one line and exit 2; a preempted run exits 75 after saving; other
    errors keep their traceback, are recorded in <log.dir>/error_rank<R>.txt, and a rank that fails because a
    peer did prints "rank R failed: <its line>" last (megatrain.train.rank_errors)."""
    from megatrain.train import rank_errors
    rank_errors.clear(cfg.log.dir, rank_errors.this_rank())
    try:
        return _train(cfg, local_rank)
    except UserError as err:
        rank_errors.record(cfg.log.dir, rank_errors.this_rank(), f"error: {err}")
        fail(err)
    except Exception as err:  # noqa: BLE001 - the traceback is kept; the cause (maybe a peer's) is printed last
        import traceback
        traceback.print_exc()
        rank_errors.report(cfg.log.dir, err)
        raise SystemExit(1) from None


def _train(cfg: Config, local_rank: int | None):
    from megatrain.checkpoint.layout_free import SaveError
    from megatrain.distributed.env import shutdown_distributed
    from megatrain.train.nonfinite import NonFiniteError
    from megatrain.train.trainer import Trainer
    from megatrain.distributed.bootstrap import bootstrap
    from megatrain.plan import memory_preflight
    launch = bootstrap(cfg, local_rank, preflight=memory_preflight)
    trainer = Trainer(cfg, local_rank=local_rank, launch=launch)
    try:
        result = trainer.run()
    except (NonFiniteError, SaveError):  # agreed by every rank: no peer waits in a collective
        shutdown_distributed()
        raise
    world = trainer.world
    shutdown_distributed()
    if trainer.preempted:
        from megatrain.train.preemption import EXIT_PREEMPTED
        _leave(EXIT_PREEMPTED)
    if world > 1:  # a launcher's rank (an in-process, one-rank run returns to its caller)
        _leave(0)
    return result


def _leave(code: int) -> None:
    """Exit a launcher's rank without interpreter teardown, once its checkpoint is saved, its logs closed and
    its process groups destroyed: a gloo rank can still abort in teardown (-6, "terminate called without an
    active exception", a gloo/DeepSpeed thread outliving Python) and turn a finished run, or a preempted one's
    75, into a failure. Seen in a 2-stage pipeline run in CI."""
    import os
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
