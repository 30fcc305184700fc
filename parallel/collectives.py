"""Autograd-aware communication over an explicit process group.

Each function is the identity (and costs nothing) when the group has a single rank, so
the same model code runs on one rank and on many. The pairs are adjoint: the backward
of a copy is a sum, of an all-gather a reduce-scatter, and the other way round.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch 2.13 renamed reduce_scatter_tensor and all_gather_into_tensor (now deprecated) to *_single
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, *, async_op: bool = False):
    """Sum the flat `x` over the group; rank r receives the r-th slice into `out`."""
    return _reduce_scatter_single(out, x, group=group, async_op=async_op)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, *, async_op: bool = False):
    """Concatenate every rank's flat `x` into `out`, rank r's at the r-th slice."""
    return _all_gather_single(out, x, group=group, async_op=async_op)


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (no autograd)."""
    size = group_size(group)
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * front.shape[0],) + front.shape[1:], dtype=x.dtype, device=x.device)
    all_gather_into(out, front, group)
    return out.movedim(0, dim)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `x` over the group and keep this rank's slice along `dim` (no autograd)."""
    size = group_size(group)
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.shape[0] // size,) + front.shape[1:], dtype=x.dtype, device=x.device)
    reduce_scatter_into(out, front, group)
    return out.movedim(0, dim)


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the group (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: sum over the group (output of a row-parallel layer). Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherAlong(torch.autograd.Function):
    """Forward: all-gather along `dim`. Backward: reduce-scatter along `dim` (every rank used every slice)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterAlong(torch.autograd.Function):
    """Forward: sum over the group, keep this rank's slice along `dim`. Backward: all-gather along `dim`."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.dim, ctx.group), None, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherAlong.apply(x, dim, group)


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterAlong.apply(x, dim, group)


# Uneven ("v") collectives over rows (dim 0). gloo has no uneven all-gather or reduce-scatter, so both are
# built from the even ones: every rank's part is padded to the largest, exchanged, and trimmed. The sizes
# (a list of ints) must be the same on every rank of the group.


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + x.shape[1:])])


def all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows, rank r contributing `sizes[r]` (no autograd)."""
    if group_size(group) == 1:
        return x
    most = max(sizes)
    out = x.new_empty((len(sizes) * most,) + x.shape[1:])
    all_gather_into(out, _pad_rows(x, most), group)
    if all(size == most for size in sizes):
        return out
    return torch.cat([out[r * most:r * most + size] for r, size in enumerate(sizes)])


def reduce_scatter_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Sum `x` (sum(sizes) rows) over the group; rank r keeps its `sizes[r]` rows (no autograd)."""
    if group_size(group) == 1:
        return x
    most = max(sizes)
    padded = torch.cat([_pad_rows(part, most) for part in x.split(sizes)])
    out = x.new_empty((most,) + x.shape[1:])
    reduce_scatter_into(out, padded, group)
    return out[:sizes[group_rank(group)]]


def all_to_all_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Send rows `input_splits[r]` of `x` (in order) to rank r; receive `output_splits[r]` rows from rank r
    (no autograd). Uneven splits work on gloo and NCCL alike."""
    if group_size(group) == 1:
        return x
    out = x.new_empty((sum(output_splits),) + x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAllV(torch.autograd.Function):
    """Forward: all-to-all of rows. Backward: the same with the splits swapped (every row goes back home)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return all_to_all_rows(grad, input_splits, output_splits, ctx.group), None, None, None


class _AllGatherV(torch.autograd.Function):
    """Forward: uneven all-gather of rows. Backward: uneven reduce-scatter (every rank used every row)."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.sizes, ctx.group), None, None


class _ReduceScatterV(torch.autograd.Function):
    """Forward: uneven reduce-scatter of rows. Backward: uneven all-gather."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return reduce_scatter_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad, ctx.sizes, ctx.group), None, None


def all_to_all_v(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Rows of `x` split by `input_splits` go to the group's ranks; returns the rows received, by source rank."""
    return x if group_size(group) == 1 else _AllToAllV.apply(x, output_splits, input_splits, group)


def all_gather_v(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's rows concatenated in group order (rank r has `sizes[r]` rows)."""
    return x if group_size(group) == 1 else _AllGatherV.apply(x, sizes, group)


def reduce_scatter_v(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """`x` (sum(sizes) rows) summed over the group; this rank keeps rows [offset_r, offset_r + sizes[r])."""
    return x if group_size(group) == 1 else _ReduceScatterV.apply(x, sizes, group)
