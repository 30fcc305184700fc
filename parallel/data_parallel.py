"""Data parallelism: gradients reduced over the replicas, bucket by bucket, while the backward pass runs.

Gradients accumulate into one contiguous fp32 buffer laid out by `parallel/buckets.py`; each
parameter's `main_grad` is its view of it (Megatron-LM's name, which Transformer Engine's fused
weight-gradient accumulation also writes into). On the last micro-batch of a step, a bucket is
reduced over its data group (DP x CP, or EDP for expert weights) as soon as its last gradient
arrives, overlapping with the rest of the backward pass: an all-reduce for the plain optimizer, a
reduce-scatter into this rank's shard buffer for the distributed one. Every replica's loss is a mean
over its own tokens, so a bucket is scaled by 1 / (DP * CP) first: the sum is then the mean over
the global batch. (An expert has already summed the gradients of every token sent to it from its
EP x ETP peers, so the sum over EDP covers each token of the stage once, and the mean over the
DP x CP loss replicas needs the same factor.) After the reduction, weights whose placement says
`sequence_parallel` (norms, GPAS gates and the router under SP), which saw only this rank's tokens,
are summed over TP, and the two copies of a tied embedding table were summed over the embedding
group before their bucket was reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.buckets import Bucket, BucketLayout
from parallel.collectives import group_size, reduce_scatter_into
from parallel.grad_norm import global_grad_norm
from parallel.placement import placement_of


class GradReducer:
    """The flat gradient buffer, the hooks that fill it, and the collectives that reduce it."""

    def __init__(self, layout: BucketLayout, topology, device: torch.device):
        self.layout, self.topology = layout, topology
        self.grad_scale = 1.0 / (topology.dp * topology.cp)
        self.grad = torch.zeros(layout.size, dtype=torch.float32, device=device)
        self.grad_shard = torch.zeros(layout.shard_size, dtype=torch.float32, device=device) if layout.sharded else None
        self.bucket_of = {}
        for bucket, p, a, b in layout.places():
            p.main_grad = self.grad[a:b].view_as(p)
            self.bucket_of[p] = bucket
            p.register_post_accumulate_grad_hook(self._on_grad)
        self.pending = {bucket: 0 for bucket in layout.buckets}
        self.handles: dict[Bucket, object] = {}
        self.sync_now = True

    @property
    def sharded(self) -> bool:
        return self.layout.sharded

    def group_of(self, bucket: Bucket):
        return self.topology.groups[bucket.group]

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's slice of a bucket, in flat-buffer coordinates."""
        return bucket.shard_range(self.topology.index_in(bucket.group))

    # ------------------------------------------------------------------ during backward

    def zero(self) -> None:
        """Start a step: empty gradients, every bucket waiting for all of its gradients."""
        self.grad.zero_()
        if self.grad_shard is not None:
            self.grad_shard.zero_()
        self.pending = {bucket: len(bucket.params) for bucket in self.layout.buckets}
        self.handles = {}

    def start_micro_batch(self, last: bool) -> None:
        """Reduce during this backward pass only when it is the step's last micro-batch (with interleaved
        pipeline chunks: each chunk's last backward)."""
        self.sync_now = last

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None
        if self.sync_now:
            bucket = self.bucket_of[p]
            self.pending[bucket] -= 1
            if self.pending[bucket] == 0 and not bucket.tied:
                self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        data = self.grad[bucket.start:bucket.end]
        if self.grad_scale != 1.0:
            data.mul_(self.grad_scale)
        handle = None
        if bucket.replicas == 1:
            if self.sharded:
                self.shard_view(bucket).copy_(data)
        elif self.sharded:
            handle = reduce_scatter_into(self.shard_view(bucket), data, self.group_of(bucket), async_op=True)
        else:
            handle = dist.all_reduce(data, group=self.group_of(bucket), async_op=True)
        self.handles[bucket] = handle

    def shard_view(self, bucket: Bucket) -> torch.Tensor:
        """This rank's reduced slice of `bucket` (distributed optimizer)."""
        return self.grad_shard[bucket.shard_start:bucket.shard_start + bucket.shard_size]

    def finish(self) -> None:
        """Complete the reduction: the tied embedding's copies are summed over the embedding group, buckets never
        completed (unused parameters) go now, in bucket order; then sequence-parallel weights are summed over TP."""
        for bucket in self.layout.buckets:
            if bucket.tied and group_size(self.topology.groups["embedding"]) > 1:
                dist.all_reduce(self.grad[bucket.start:bucket.end], group=self.topology.groups["embedding"])
            if bucket not in self.handles:
                self._launch(bucket)
        for handle in self.handles.values():
            if handle is not None:
                handle.wait()
        self.handles = {bucket: None for bucket in self.handles}
        if group_size(self.topology.tp_group) > 1:
            views = [v for _, v in self.owned(lambda p: placement_of(p).partial_over_tp)]
            if views:
                flat = torch.cat([v.flatten() for v in views])
                dist.all_reduce(flat, group=self.topology.tp_group)
                offset = 0
                for v in views:
                    v.copy_(flat[offset:offset + v.numel()].view_as(v))
                    offset += v.numel()

    # ------------------------------------------------------------------ after the reduction

    def owned_ranges(self, select=lambda p: True) -> list[tuple[torch.nn.Parameter, int, int]]:
        """(param, start, end): the flat-buffer ranges of the reduced gradients this rank holds, whole
        parameters without sharding, else the parts of parameters inside this rank's slices."""
        out = []
        for bucket in self.layout.buckets:
            lo, hi = self.shard_range(bucket) if self.sharded else (bucket.start, bucket.end)
            for p, (a, b) in zip(bucket.params, bucket.ranges):
                a, b = max(a, lo), min(b, hi)
                if a < b and select(p):
                    out.append((p, a, b))
        return out

    def reduced_grad(self, p: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        """The reduced gradient of flat range [start, end) (inside one of this rank's slices)."""
        if not self.sharded:
            return self.grad[start:end]
        bucket = self.bucket_of[p]
        lo, _ = self.shard_range(bucket)
        return self.shard_view(bucket)[start - lo:end - lo]

    def owned(self, select=lambda p: True) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        return [(p, self.reduced_grad(p, a, b)) for p, a, b in self.owned_ranges(select)]

    def grad_norm(self, select=lambda p: True) -> float:
        """The global L2 norm of the selected reduced gradients (`parallel/grad_norm.py` says who counts what)."""
        pieces = [(placement_of(p), g) for p, g in self.owned(select)]
        return global_grad_norm(pieces, self.topology, sharded=self.sharded, device=self.grad.device)

    def scale(self, coefficient: float, select=lambda p: True) -> None:
        for _, g in self.owned(select):
            g.mul_(coefficient)
