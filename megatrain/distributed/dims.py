"""ParallelDims: (tp, pp, dp) → DeepSpeed topology and the torch process groups each rank belongs to.

Groups are objects handed to the layers and to DeepSpeed (through the ``mpu`` interface below), never
module-level globals. Rank order follows DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data,
model; model fastest), so tensor-parallel peers are adjacent ranks (same node on a cluster).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class ParallelDims:
    tp: int
    pp: int
    dp: int
    rank: int
    topology: object = field(repr=False)
    tp_group: object = field(repr=False)
    pp_group: object = field(repr=False)
    dp_group: object = field(repr=False)
    mp_group: object = field(repr=False)  # tp × pp: the ranks holding different parts of one model replica

    @property
    def tp_rank(self) -> int:
        return self.topology.get_coord(self.rank).model

    @property
    def pp_rank(self) -> int:
        return self.topology.get_coord(self.rank).pipe

    @property
    def dp_rank(self) -> int:
        return self.topology.get_coord(self.rank).data

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def build_parallel_dims(*, tp: int, pp: int, dp: int) -> ParallelDims:
    """Create every process group of the layout. Collective: all ranks call it in the same order."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world, rank = dist.get_world_size(), dist.get_rank()
    assert tp * pp * dp == world, f"tp*pp*dp={tp * pp * dp} != world size {world}"
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)

    def my_group(lists):
        mine = None
        for ranks in lists:  # every rank creates every group, in the same order (torch requires it)
            g = dist.new_group(ranks=ranks) if len(ranks) < world else dist.group.WORLD
            if rank in ranks:
                mine = g
        return mine

    tp_group = my_group(topo.get_axis_comm_lists("model"))
    pp_group = my_group(topo.get_axis_comm_lists("pipe"))
    dp_group = my_group(topo.get_axis_comm_lists("data"))
    # model-parallel group: all ranks sharing a data coordinate
    mp_lists = [topo.filter_match(data=d) for d in range(dp)]
    mp_group = my_group(mp_lists)
    return ParallelDims(tp, pp, dp, rank, topo, tp_group, pp_group, dp_group, mp_group)


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed's engine asks for groups (ZeRO partitions over data-parallel,
    gradient clipping reduces norms over model-parallel)."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.dims.tp

    def get_tensor_model_parallel_group(self):
        return self.dims.tp_group

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_pipeline_model_parallel_rank(self):
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.dims.pp

    def get_pipeline_model_parallel_group(self):
        return self.dims.pp_group
