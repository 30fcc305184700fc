"""Boxes: a rank's pieces of a global tensor, given to torch.distributed.checkpoint with their places in it.

A layout-free checkpoint keys every tensor by its name alone (`model.layers.3.mlp.up.weight`) and lets each
rank say which boxes of the global tensor it holds: the offsets and sizes of each piece. DCP writes each
box once (identical boxes of replicas are deduplicated) and, on load, intersects the boxes a rank asks for
with the boxes that were saved, whatever layout saved them. So a change of TP, PP, DP, CP, EP or ETP, or of
the optimizer's sharding, is only a change of boxes.

The boxes of a rank are not always one slab. The distributed optimizer steps a flat slice of each bucket,
and the slice may begin and end inside a parameter: its piece of that parameter is a flat range of the
rank's local tensor, which `flat_boxes` cuts into contiguous boxes (a partial row, whole rows, a partial
row; recursively for stacks of experts).

The carrier is torch's `ShardedTensor`, built from local shards and global metadata without communication
(`_init_from_local_shards_and_global_metadata`). DTensor was the other candidate and is not used: it can
describe only one even `torch.chunk` piece per rank, not the optimizer's uneven flat slices. ShardedTensor's
metadata must cover the whole tensor with boxes that do not overlap; a rank knows only its own, so the rest
is covered by filler boxes (`complement`) assigned to another rank. DCP reads only a tensor's local shards
and its global size, so the fillers are never written or read.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.distributed as dist

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in the global tensor


def flat_boxes(shape: Sequence[int], lo: int, hi: int) -> list[Box]:
    """Boxes covering elements [lo, hi) of a row-major tensor of `shape`, in flat order; each box is a
    contiguous range of the flat tensor, so a flat slice of the right length views as it."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    rest = len(shape) - 1
    boxes: list[Box] = []
    row = lo // inner
    if lo % inner:  # a partial first row
        stop = min(hi, (row + 1) * inner)
        boxes += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], lo - row * inner, stop - row * inner)]
        lo, row = stop, row + 1
        if lo >= hi:
            return boxes
    whole = hi // inner  # rows before it are complete
    if whole > row:
        boxes.append(((row, *(0,) * rest), (whole - row, *shape[1:])))
    if hi % inner:  # a partial last row
        boxes += [((whole, *o), (1, *s)) for o, s in flat_boxes(shape[1:], 0, hi - whole * inner)]
    return boxes


def shifted(boxes: list[Box], by: Sequence[int]) -> list[Box]:
    return [(tuple(o + d for o, d in zip(offsets, by)), sizes) for offsets, sizes in boxes]


def complement(shape: Sequence[int], box: Box) -> list[Box]:
    """Boxes covering all of a tensor of `shape` except `box`, without overlaps (at most 2 per dimension)."""
    offsets, sizes = box
    out: list[Box] = []
    lo, span = [0] * len(shape), list(shape)  # the region not yet covered: the box's rows in dims before d
    for d, n in enumerate(shape):
        before, after = offsets[d], n - offsets[d] - sizes[d]
        if before:
            out.append((tuple(lo[:d]) + (0,) + (0,) * (len(shape) - d - 1),
                        tuple(span[:d]) + (before,) + tuple(shape[d + 1:])))
        if after:
            out.append((tuple(lo[:d]) + (offsets[d] + sizes[d],) + (0,) * (len(shape) - d - 1),
                        tuple(span[:d]) + (after,) + tuple(shape[d + 1:])))
        lo[d], span[d] = offsets[d], sizes[d]
    return out


def boxed(pieces: list[tuple[Box, torch.Tensor]], global_shape: Sequence[int],
          region: Box | None = None) -> torch.Tensor:
    """The tensor DCP saves and loads for `pieces` [(box, contiguous tensor of the box's sizes)]: the tensor
    itself when one piece covers all of it, else a ShardedTensor of these pieces. `region`: a box that holds
    every piece (this rank's local tensor); the pieces must cover a contiguous flat range of it (what
    `flat_boxes` gives); by default the one piece's own box. Loading writes into the pieces in place."""
    global_shape = tuple(global_shape)
    if len(pieces) == 1 and tuple(pieces[0][0][1]) == global_shape:
        return pieces[0][1]
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise ValueError("a piece of a tensor on a single rank: its other pieces are nowhere")
    device = pieces[0][1].device
    where = f"{device.type}:{device.index}" if device.type == "cuda" else device.type
    mine = [ShardMetadata(list(o), list(s), f"rank:{rank}/{where}") for (o, s), _ in pieces]
    if region is None:
        if len(pieces) > 1:
            raise ValueError("several pieces need the region of the local tensor that holds them")
        region = pieces[0][0]
    fillers = complement(global_shape, region) + _rest_of_region(region, [b for b, _ in pieces])
    other = f"rank:{(rank + 1) % world}/{where}"
    metadata = ShardedTensorMetadata(
        mine + [ShardMetadata(list(o), list(s), other) for o, s in fillers if math.prod(s)],
        torch.Size(global_shape), TensorProperties(dtype=pieces[0][1].dtype))
    shards = [Shard(t, m) for (_, t), m in zip(pieces, mine)]
    with warnings.catch_warnings():  # "ShardedTensor is deprecated, use DTensor": see the module docstring
        warnings.simplefilter("ignore")
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata)


def _rest_of_region(region: Box, boxes: list[Box]) -> list[Box]:
    """The parts of `region` before and after the flat range that `boxes` (in flat order) cover."""
    offsets, sizes = region
    first, last = boxes[0], boxes[-1]
    lo = _flat_index(sizes, [o - r for o, r in zip(first[0], offsets)])
    hi = _flat_index(sizes, [o + s - 1 - r for o, s, r in zip(last[0], last[1], offsets)]) + 1
    total = math.prod(sizes)
    return shifted(flat_boxes(sizes, 0, lo) + flat_boxes(sizes, hi, total), offsets)


def _flat_index(shape: Sequence[int], index: Sequence[int]) -> int:
    flat = 0
    for n, i in zip(shape, index):
        flat = flat * n + i
    return flat
