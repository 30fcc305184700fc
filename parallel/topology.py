"""Where each rank sits in the two parallel views, and the process groups it talks over.

Layers receive the `Topology` in their constructor; nothing reads parallel state from
module globals. This first version lays out a single rank; the multi-rank layout
(Megatron's masked orthogonal rank groups for the dense and the expert view) grows
here without changing how layers consume it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


class TopologyError(ValueError):
    """An impossible parallel layout; the message names the fields."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None

    @classmethod
    def build(cls, world_size: int, rank: int, tensor: int = 1, context: int = 1, pipeline: int = 1) -> "Topology":
        model_parallel = tensor * context * pipeline
        if world_size % model_parallel:
            raise TopologyError(
                f"parallel.tensor x parallel.context x parallel.pipeline = {model_parallel} does not divide "
                f"the world size {world_size}"
            )
        if world_size > 1:
            raise TopologyError(
                f"this version trains on a single rank; got a world size of {world_size}: run without torchrun"
            )
        return cls(world_size=world_size, rank=rank, tp=tensor, cp=context, pp=pipeline, dp=world_size // model_parallel)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} cp {self.cp_rank}/{self.cp} dp {self.dp_rank}/{self.dp} pp {self.pp_rank}/{self.pp}"
