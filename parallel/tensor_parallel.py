"""Tensor- and sequence-parallel layers: each rank holds a slice of a weight and talks over the TP group.

Without sequence parallelism, activations between layers are replicated on the TP ranks:
a column-parallel layer copies its input in (gradients summed on the way back) and a
row-parallel layer sums its partial outputs. With sequence parallelism, activations
between layers are split along the sequence instead: a column-parallel layer all-gathers
its input along the sequence, a row-parallel layer reduce-scatters its output, and the
norms in between run on sequence shards (their weight gradients are then partial sums,
added over TP by the gradient synchronisation: their placement says `sequence_parallel`). Whether
sequence parallelism is on is the topology's to say (`topology.sequence_parallel`).

Every weight gets its `Placement` (parallel/placement.py) here, where it is made, so that
initialisation can draw the global tensor from a name-keyed generator and keep this rank's
piece: the same seed gives the same model whatever the layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.collectives import (
    copy_to_group, gather_along, group_rank, group_size, reduce_from_group, reduce_scatter_along,
)
from parallel.placement import Placement, place, placement_of, split
from parallel.topology import Topology, TopologyError

SEQ_DIM = 1  # activations between layers are [batch, sequence, hidden]


def tensor_parallel_weight(local_shape: tuple[int, int], global_shape: tuple[int, int], *, dim: int,
                           topology: Topology) -> nn.Parameter:
    """A new weight holding this TP rank's piece of dimension `dim` of a `global_shape` tensor."""
    placement = Placement(tuple(global_shape), split(dim, "tp", rank=topology.tp_rank, size=topology.tp))
    return place(nn.Parameter(torch.empty(local_shape)), placement)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise TopologyError(f"{what}={total} is not divisible by the tensor-parallel size {parts}")
    return total // parts


def enter_tensor_parallel(x: torch.Tensor, topology: Topology) -> torch.Tensor:
    """The input of a column-parallel matmul: the full (local) sequence, replicated over TP."""
    if topology.sequence_parallel:
        return gather_along(x, SEQ_DIM, topology.tp_group)
    return copy_to_group(x, topology.tp_group)


def leave_tensor_parallel(y: torch.Tensor, topology: Topology) -> torch.Tensor:
    """The output of a row-parallel matmul: partial sums added over TP (and split along the sequence with SP)."""
    if topology.sequence_parallel:
        return reduce_scatter_along(y, SEQ_DIM, topology.tp_group)
    return reduce_from_group(y, topology.tp_group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; each rank produces its slice of the outputs."""

    def __init__(self, in_features: int, out_features: int, topology: Topology):
        super().__init__()
        self.topology = topology
        local_out = _divide(out_features, topology.tp, "output features")
        self.weight = tensor_parallel_weight((local_out, in_features), (out_features, in_features), dim=0,
                                             topology=topology)

    def forward(self, x: torch.Tensor, entered: bool = False) -> torch.Tensor:
        """`entered`: `x` is already the output of `enter_tensor_parallel` (shared by several layers)."""
        if not entered:
            x = enter_tensor_parallel(x, self.topology)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial outputs are summed over the TP group."""

    def __init__(self, in_features: int, out_features: int, topology: Topology):
        super().__init__()
        self.topology = topology
        local_in = _divide(in_features, topology.tp, "input features")
        self.weight = tensor_parallel_weight((out_features, local_in), (out_features, in_features), dim=1,
                                             topology=topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leave_tensor_parallel(F.linear(x, self.weight), self.topology)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ids outside this rank's range contribute zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, topology: Topology):
        super().__init__()
        self.topology = topology
        local = _divide(vocab_size, topology.tp, "vocabulary size")
        self.start = topology.tp_rank * local
        self.weight = tensor_parallel_weight((local, hidden_size), (vocab_size, hidden_size), dim=0, topology=topology)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.topology.tp == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.start + self.weight.shape[0])
        local_ids = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tensor_parallel(out, self.topology)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary across the TP group, without gathering them:
    only the per-token max, the sum of exponentials and the target logit cross the group."""

    @staticmethod
    def forward(ctx, logits, labels, group):
        local_vocab = logits.shape[-1]
        start = group_rank(group) * local_vocab
        logits = logits.float()
        maximum = logits.max(dim=-1).values
        torch.distributed.all_reduce(maximum, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - maximum.unsqueeze(-1)
        outside = (labels < start) | (labels >= start + local_vocab)
        local_labels = (labels - start).masked_fill(outside, 0)
        target = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([target, sum_exp])
        torch.distributed.all_reduce(both, group=group)
        target, sum_exp = both[0], both[1]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_labels, outside)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad):
        softmax, local_labels, outside = ctx.saved_tensors
        grad_logits = softmax
        hit = (~outside).to(softmax.dtype)
        grad_logits.scatter_add_(-1, local_labels.unsqueeze(-1), -hit.unsqueeze(-1))
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, topology: Topology) -> torch.Tensor:
    """Per-token loss of logits [..., vocab / TP] against labels [...] (fp32)."""
    if group_size(topology.tp_group) == 1:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits, labels, topology.tp_group)


def init_normal_(param: nn.Parameter, std: float, generator: torch.Generator) -> None:
    """Fill `param` with this rank's piece of a global N(0, std) tensor drawn from `generator`."""
    placement = placement_of(param)
    full = torch.empty(placement.global_shape, dtype=torch.float32)
    full.normal_(0.0, std, generator=generator)
    with torch.no_grad():
        param.copy_(full[placement.local_slices()])
