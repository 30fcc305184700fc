"""Where each parameter's gradient lives in the flat gradient buffer, cut into buckets: a pure layout, no ranks.

Buckets follow the parameters in reverse order (roughly the order in which backward produces their
gradients) so that a bucket is complete, and can be reduced, while backward goes on. A bucket holds
one kind of weight (dense weights, averaged over DP x CP; expert weights, over EDP: they are reduced
over different groups), the weights of one pipeline chunk (interleaved chunks finish their backward
passes at different times), and closes once it holds `bucket_elements`. The copies of a tied
embedding table get a bucket of their own, last: it is first summed over the embedding group.

For the distributed optimizer every bucket is padded to a multiple of its group's size, so that rank
r of the group owns the r-th equal slice; the slices of all buckets of a rank, back to back, form
its shard buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parallel.placement import placement_of


@dataclass(frozen=True, eq=False, kw_only=True)  # compared and hashed by identity: buckets key the reducer's state
class Bucket:
    params: tuple[torch.nn.Parameter, ...]
    ranges: tuple[tuple[int, int], ...]  # each param's [start, end) in the flat buffer
    start: int  # the bucket's range in the flat buffer (padded for sharding)
    end: int
    group: str  # the replicas it is reduced over: "dp-cp" (dense weights) or "edp" (experts)
    replicas: int  # ranks in that group
    shard_start: int  # where each rank's slice of this bucket begins in its shard buffer
    tied: bool = False  # the tied embedding's copies: summed over the embedding group before the reduction

    @property
    def shard_size(self) -> int:
        """Elements of each rank's slice."""
        return (self.end - self.start) // self.replicas

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The slice that rank `rank` of the group owns, in flat-buffer coordinates."""
        return self.start + rank * self.shard_size, self.start + (rank + 1) * self.shard_size


@dataclass(frozen=True, kw_only=True)
class BucketLayout:
    params: tuple[torch.nn.Parameter, ...]  # in the model's order
    buckets: tuple[Bucket, ...]
    size: int  # elements of the flat buffer
    shard_size: int  # elements of each rank's shard buffer (the sum of its slices)
    sharded: bool

    @classmethod
    def build(cls, params: list[torch.nn.Parameter], *, replicas: dict[str, int], bucket_elements: int,
              sharded: bool) -> "BucketLayout":
        """`replicas`: the size of each data group ("dp-cp", "edp"); `sharded`: pad for the distributed optimizer."""
        groups: list[tuple[list, str, bool]] = []  # (params, data group, tied)
        for group in ("dp-cp", "edp"):
            current: list = []
            for p in reversed(params):
                where = placement_of(p)
                if where.tied or where.data_group != group:
                    continue
                if current and where.chunk != placement_of(current[-1]).chunk:
                    groups.append((current, group, False))
                    current = []
                current.append(p)
                if sum(q.numel() for q in current) >= bucket_elements:
                    groups.append((current, group, False))
                    current = []
            if current:
                groups.append((current, group, False))
        tied = [p for p in params if placement_of(p).tied]
        if tied:
            groups.append((tied, "dp-cp", True))
        buckets, start, shard_start = [], 0, 0
        for members, group, is_tied in groups:
            size = replicas[group]
            ranges, offset = [], start
            for p in members:
                ranges.append((offset, offset + p.numel()))
                offset += p.numel()
            end = start + math.ceil((offset - start) / size) * size if sharded else offset
            bucket = Bucket(params=tuple(members), ranges=tuple(ranges), start=start, end=end, group=group,
                            replicas=size, shard_start=shard_start, tied=is_tied)
            buckets.append(bucket)
            start, shard_start = end, shard_start + bucket.shard_size
        return cls(params=tuple(params), buckets=tuple(buckets), size=start, shard_size=shard_start if sharded else 0,
                   sharded=sharded)

    def places(self):
        """(bucket, param, start, end) for every parameter, in buffer order."""
        for bucket in self.buckets:
            for p, (a, b) in zip(bucket.params, bucket.ranges):
                yield bucket, p, a, b
