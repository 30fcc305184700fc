"""The global gradient norm: every element of the model counted exactly once over the whole world.

Each rank holds reduced gradients for the pieces of weights it owns; many ranks hold the same
piece. One rule per kind of placement says which of them counts it:

- replicated over its data group (DP x CP, or EDP for experts): without sharding every replica holds
  the whole reduced gradient, so only rank 0 of the group counts it; with the distributed optimizer
  each rank owns a distinct slice and counts that;
- not split over its tensor group (TP, or ETP for experts): the tensor-parallel ranks hold equal
  copies (norms, GPAS gates, the router, unsplit experts), so only rank 0 of that group counts it;
  a split weight counts on every rank (each holds its own piece);
- a copy of the tied embedding table: the first and the last pipeline stage hold equal copies, so
  only the first stage counts it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.placement import Placement


def counted_here(placement: Placement, topology, *, sharded: bool) -> bool:
    """Whether this rank counts its piece of a weight with this placement (the rules above)."""
    if not sharded and topology.index_in(placement.data_group) != 0:
        return False
    if placement.tied and not topology.is_first_stage:
        return False
    return placement.split_over_tensor_group or topology.index_in(placement.tensor_group) == 0


def global_grad_norm(pieces, topology, *, sharded: bool, device: torch.device) -> float:
    """L2 norm over the world of `pieces`, (placement, reduced gradient) pairs of this rank; every rank calls it."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for placement, grad in pieces:
        if counted_here(placement, topology, sharded=sharded):
            total += grad.double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total.sqrt())
