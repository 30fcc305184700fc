"""Tensor- and sequence-parallel layers: each rank holds a slice of a weight and talks over the TP group.

Without sequence parallelism, activations between layers are replicated on the TP ranks:
a column-parallel layer copies its input in (gradients summed on the way back) and a
row-parallel layer sums its partial outputs. With sequence parallelism, activations
between layers are split along the sequence instead: a column-parallel layer all-gathers
its input along the sequence, a row-parallel layer reduce-scatters its output, and the
norms in between run on sequence shards (their weight gradients are then partial sums,
added over TP by the gradient synchronisation: their placement says `partial_over_tp`). Whether
sequence parallelism is on is the topology's to say (`topology.sequence_parallel`).

A layer's GEMM runs `F.linear`, or in FP8 through the object in its `fp8` attribute (parallel/fp8.py, or the
Transformer Engine adapter in parallel/te_backend.py) when a run enables it (pretrain/model/fp8.py): the
collectives around the GEMM are the same either way.

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
        self.fp8 = None  # the FP8 GEMM (x, weight) -> y, when the run enables FP8 for this layer

    def forward(self, x: torch.Tensor, entered: bool = False) -> torch.Tensor:
        """`entered`: `x` is already the output of `enter_tensor_parallel` (shared by several layers)."""
        if not entered:
            x = enter_tensor_parallel(x, self.topology)
        return F.linear(x, self.weight) if self.fp8 is None else self.fp8(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial outputs are summed over the TP group."""

    def __init__(self, in_features: int, out_features: int, topology: Topology):
        super().__init__()
        self.topology = topology
        local_in = _divide(in_features, topology.tp, "input features")
        self.weight = tensor_parallel_weight((out_features, local_in), (out_features, in_features), dim=1,
                                             topology=topology)
        self.fp8 = None  # as in ColumnParallelLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.fp8 is None else self.fp8(x, self.weight)
        return leave_tensor_parallel(y, self.topology)


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


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The output layer and the vocabulary-parallel cross-entropy in one, a chunk of tokens at a time.

    Unfused, the logits [tokens, vocab / TP] exist in the matmul's dtype and then as fp32 tensors (the logits,
    shifted, exponentiated: three at once, the last one saved for backward as the softmax): at 16k tokens and a
    128k vocabulary, 4 GB in bf16 and 8 GB each in fp32 on one rank. Here each chunk's logits live only while that
    chunk is reduced; backward keeps the per-token maximum and sum of exponentials (8 bytes a token) and
    recomputes each chunk's logits: one more output-layer matmul, bought for the memory.
    Per chunk the arithmetic is today's, operation for operation: the global maximum (all-reduced over TP), the
    shifted target logit and the sum of exponentials (all-reduced together), softmax - onehot times the incoming
    gradient; only the sum of grad_weight over the chunks is taken in another order (in fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk, compute):
        # hidden [tokens, hidden] (replicated over TP), weight [vocab / TP, hidden], labels [tokens];
        # compute: the dtype of the matmuls, as autocast would pick it for F.linear
        tokens, local_vocab = labels.shape[0], weight.shape[0]
        start = group_rank(group) * local_vocab
        parallel = group_size(group) > 1
        w = weight.to(compute)
        maximum = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        sum_exp = torch.empty_like(maximum)
        losses = torch.empty_like(maximum)
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, tokens, chunk):
                b = min(a + chunk, tokens)
                logits = F.linear(hidden[a:b].to(compute), w).float()  # [n, vocab / TP]: the only big tensor
                top = logits.max(dim=-1).values
                if parallel:
                    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
                shifted = logits.sub_(top.unsqueeze(-1))
                local_labels, outside = _local_labels(labels[a:b], start, local_vocab)
                target = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
                both = torch.stack([target, shifted.exp_().sum(dim=-1)])  # [2, n]
                if parallel:
                    torch.distributed.all_reduce(both, group=group)
                maximum[a:b], sum_exp[a:b] = top, both[1]
                losses[a:b] = both[1].log() - both[0]
                del logits, shifted  # before the next chunk's logits: one chunk alive at a time, not two
        ctx.save_for_backward(hidden, weight, labels, maximum, sum_exp)
        ctx.group, ctx.chunk, ctx.compute = group, chunk, compute
        return losses

    @staticmethod
    def backward(ctx, grad):
        # grad [tokens]: d(objective) / d(per-token loss)
        hidden, weight, labels, maximum, sum_exp = ctx.saved_tensors
        tokens, local_vocab = labels.shape[0], weight.shape[0]
        start, chunk, compute = group_rank(ctx.group) * local_vocab, ctx.chunk, ctx.compute
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        w = weight.to(compute)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        accumulate = torch.promote_types(torch.float32, compute)  # of grad_weight over the chunks
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, tokens, chunk):
                b = min(a + chunk, tokens)
                h = hidden[a:b].to(compute)  # [n, hidden]
                softmax = F.linear(h, w).float().sub_(maximum[a:b].unsqueeze(-1)).exp_()
                softmax.div_(sum_exp[a:b].unsqueeze(-1))  # [n, vocab / TP]
                local_labels, outside = _local_labels(labels[a:b], start, local_vocab)
                hit = (~outside).to(softmax.dtype)
                softmax.scatter_add_(-1, local_labels.unsqueeze(-1), -hit.unsqueeze(-1))
                grad_logits = softmax.mul_(grad[a:b].unsqueeze(-1)).to(compute)  # [n, vocab / TP]
                del softmax  # the fp32 one, when the matmuls run in bf16
                if want_hidden:
                    grad_hidden[a:b] = grad_logits @ w  # this rank's part: summed over TP by enter_tensor_parallel
                if want_weight:
                    if compute == accumulate:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:  # a [vocab / TP, hidden] product in the compute dtype, rounded as F.linear's would be
                        grad_weight += grad_logits.t() @ h
                del grad_logits  # before the next chunk's logits
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _local_labels(labels: torch.Tensor, start: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as indices into this rank's vocabulary slice (0 where outside it), and where they are outside."""
    outside = (labels < start) | (labels >= start + local_vocab)
    return (labels - start).masked_fill(outside, 0), outside


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would compute in here: autocast's, where it is on and casts these."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                        topology: Topology, chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token loss [...] (fp32) of the logits F.linear(hidden, weight) [..., vocab / TP] against labels [...],
    the same as `vocab_parallel_cross_entropy(F.linear(hidden, weight), labels, topology)` (under autocast too)
    but computed `chunk_tokens` tokens at a time (None or 0: all at once), so that no tensor of
    [tokens, vocab / TP] outlives one chunk, in forward or backward.

    `hidden` [..., hidden] is the output of `enter_tensor_parallel` (replicated over TP, gathered along the
    sequence under SP), `weight` [vocab / TP, hidden] this rank's slice of the output layer or tied embedding."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [tokens, hidden]
    flat_labels = labels.reshape(-1)
    chunk = max(1, min(chunk_tokens or flat_labels.shape[0], flat_labels.shape[0]))
    losses = _VocabParallelLinearCrossEntropy.apply(flat_hidden, weight, flat_labels, topology.tp_group, chunk,
                                                    _matmul_dtype(hidden, weight))
    return losses.view(labels.shape)


def init_normal_(param: nn.Parameter, std: float, generator: torch.Generator) -> None:
    """Fill `param` with this rank's piece of a global N(0, std) tensor drawn from `generator`."""
    placement = placement_of(param)
    full = torch.empty(placement.global_shape, dtype=torch.float32)
    full.normal_(0.0, std, generator=generator)
    with torch.no_grad():
        param.copy_(full[placement.local_slices()])
