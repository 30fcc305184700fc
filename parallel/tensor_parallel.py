"""Tensor-parallel layers: each rank holds a slice of the weight and communicates over the TP group.

Every weight carries `full_shape`, `partition_dim` and `partition_stride` so that
initialisation can draw the full tensor from a name-keyed generator and keep this
rank's slice: the same seed gives the same model whatever the layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.collectives import copy_to_group, reduce_from_group
from parallel.topology import Topology


def mark_partition(param: nn.Parameter, full_shape, dim: int | None, stride: int = 1) -> nn.Parameter:
    param.full_shape = tuple(full_shape)
    param.partition_dim = dim
    param.partition_stride = stride
    return param


def take_shard(full: torch.Tensor, dim: int | None, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of `full` along `dim`. With stride k the dimension holds k blocks
    (for example gate and up projections) and each rank takes its slice of every block."""
    if dim is None or size == 1:
        return full
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {parts}")
    return total // parts


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; each rank produces its slice of the outputs."""

    def __init__(self, in_features: int, out_features: int, topology: Topology, stride: int = 1, bias: bool = False):
        super().__init__()
        self.group = topology.tp_group
        local_out = _divide(out_features, topology.tp, "output features")
        self.weight = mark_partition(nn.Parameter(torch.empty(local_out, in_features)), (out_features, in_features), 0, stride)
        self.bias = mark_partition(nn.Parameter(torch.zeros(local_out)), (out_features,), 0, stride) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial outputs are summed over the TP group."""

    def __init__(self, in_features: int, out_features: int, topology: Topology, bias: bool = False):
        super().__init__()
        self.group = topology.tp_group
        local_in = _divide(in_features, topology.tp, "input features")
        self.weight = mark_partition(nn.Parameter(torch.empty(out_features, local_in)), (out_features, in_features), 1)
        self.bias = mark_partition(nn.Parameter(torch.zeros(out_features)), (out_features,), None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ids outside this rank's range contribute zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, topology: Topology):
        super().__init__()
        self.group = topology.tp_group
        local = _divide(vocab_size, topology.tp, "vocabulary size")
        self.start = topology.tp_rank * local
        self.end = self.start + local
        self.weight = mark_partition(nn.Parameter(torch.empty(local, hidden_size)), (vocab_size, hidden_size), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.end - self.start == self.weight.full_shape[0]:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local_ids = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)


def init_normal_(param: nn.Parameter, std: float, generator: torch.Generator, rank: int, size: int) -> None:
    """Fill `param` with this rank's slice of a full N(0, std) tensor drawn from `generator`."""
    full = torch.empty(param.full_shape, dtype=torch.float32)
    full.normal_(0.0, std, generator=generator)
    with torch.no_grad():
        param.copy_(take_shard(full, param.partition_dim, param.partition_stride, rank, size))


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "init_normal_",
    "mark_partition",
    "take_shard",
]
