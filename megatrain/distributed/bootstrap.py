"""A launch's bootstrap, done once: the layout checked against the launcher's world size, an optional preflight
(the memory planner, passed in by the launcher), then the process groups. The Trainer takes the result.

The order matters: every check that can refuse the run happens before any process group exists, so a bad layout
or one predicted not to fit fails on every rank at once with the same one-line reason, never as a collective hang.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatrain.config import Config, Layout, resolve_layout
from megatrain.config.preflight import preflight as config_preflight


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int
    layout: Layout
    dims: object  # megatrain.distributed.dims.ParallelDims


def bootstrap(cfg: Config, local_rank: int | None = None, *,
              preflight: Callable[[Config, int], None] | None = None) -> Launch:
    """Check, then create the process groups of ``cfg``'s layout: the config's own preflight (WORLD_SIZE, kernels
    on this machine, output dirs, layout, merged DeepSpeed config), then ``preflight(cfg, world_size)`` if given,
    which raises a UserError to refuse the run (launchers pass the memory planner's check)."""
    import os

    from megatrain.distributed.env import launcher_env
    os.environ.update(launcher_env(dict(os.environ)))  # srun / mpirun set no WORLD_SIZE; the checks below read it
    world = config_preflight(cfg)
    if preflight is not None:
        preflight(cfg, world)
    from megatrain.distributed.dims import build_parallel_dims
    from megatrain.distributed.env import init_distributed
    rank, world, lr = init_distributed(local_rank)
    layout = resolve_layout(cfg, world)
    dims = build_parallel_dims(tp=layout.tp, pp=layout.pp, dp=layout.dp)
    return Launch(rank=rank, world=world, local_rank=lr, layout=layout, dims=dims)
