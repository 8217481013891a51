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
    """Build the Trainer (a bad config, layout or checkpoint is one line and exit 2) and run it; errors during
    training keep their traceback."""
    from megatrain.distributed.bootstrap import bootstrap
    from megatrain.plan import memory_preflight
    from megatrain.train.trainer import Trainer
    try:
        launch = bootstrap(cfg, local_rank, preflight=memory_preflight)
        trainer = Trainer(cfg, local_rank=local_rank, launch=launch)
    except UserError as err:
        fail(err)
    result = trainer.run()
    from megatrain.distributed.env import shutdown_distributed
    shutdown_distributed()
    return result
