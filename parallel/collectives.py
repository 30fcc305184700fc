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


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Sum the flat `x` over the group; rank r receives the r-th slice into `out`."""
    return _reduce_scatter_single(out, x, group=group, async_op=async_op)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
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
