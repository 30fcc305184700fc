"""Data parallelism: gradient buckets reduced while the backward pass runs, and the optimizers over them.

Gradients accumulate into one contiguous fp32 buffer (`param.main_grad` views), split into
buckets in backward order. On the last micro-batch of a step, a bucket is reduced over the
data x context-parallel group as soon as its last gradient arrives, overlapping with the
rest of the backward pass: an all-reduce for the plain optimizer, a reduce-scatter for
the distributed one. Every replica's loss is a mean over its own tokens, so the bucket is
scaled by 1 / (DP * CP) first: the sum is then the mean over the global batch. Weights
marked `sequence_parallel` (norms, GPAS gates under SP) saw only this rank's tokens and
are summed over TP afterwards.

The distributed optimizer (ZeRO-1) keeps the parameters in a flat buffer laid out like the
gradients; rank r of a bucket's replica group (DP x CP, or EDP for expert weights) owns the r-th
slice of the bucket, steps AdamW on that slice only (so Adam states are sharded), and all-gathers
the updated parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.collectives import all_gather_into, group_size, reduce_scatter_into


@dataclass
class Bucket:
    params: list
    start: int  # range in the flat buffers, padded to a multiple of the group size
    end: int
    group: object  # the replicas it is reduced over: DP x CP for dense weights, EDP for experts
    size: int
    rank: int  # this rank's index in `group`
    shard_start: int = 0  # where this rank's slice lives in the shard buffer
    pending: int = 0
    handle: object = None
    launched: bool = False
    deferred: bool = False  # tied embedding copies: summed over the embedding group first, in finish()
    ranges: dict = field(default_factory=dict)  # param -> (start, end) in the flat buffers

    @property
    def shard_size(self) -> int:
        """Elements of each rank's slice."""
        return (self.end - self.start) // self.size


class GradBuffer:
    """Contiguous gradient buffer in buckets; reduces each bucket over its replicas as soon as it is complete.

    Expert weights (`param.expert`) are replicated over the expert-data-parallel group (EDP), the others
    over DP x CP: they get buckets of their own. Both are scaled by 1 / (DP * CP): an expert has already
    summed the gradients of every token sent to it from its EP x ETP peers, so the sum over EDP covers
    each token of the stage once, and the mean over the DP x CP loss replicas needs that factor."""

    def __init__(self, model: torch.nn.Module, topology, bucket_mb: float = 25.0, shard: bool = False):
        self.topology, self.shard = topology, shard
        self.grad_scale = 1.0 / (topology.dp * topology.cp)
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self.buckets, start = [], 0
        limit = int(bucket_mb * 2**20 / 4)
        replicas = {False: (topology.dp_cp_group, topology.coords["dp_cp"]),
                    True: (topology.groups["edp"], topology.coords["edp"])}
        for expert in (False, True):
            current = []
            for p in reversed(self.params):  # roughly the order in which backward produces gradients
                if getattr(p, "tied_embedding", False) or getattr(p, "expert", False) != expert:
                    continue
                if current and getattr(p, "pipeline_chunk", 0) != getattr(current[-1], "pipeline_chunk", 0):
                    start = self._close(current, start, *replicas[expert])  # interleaved chunks finish apart
                    current = []
                current.append(p)
                if sum(q.numel() for q in current) >= limit:
                    start = self._close(current, start, *replicas[expert])
                    current = []
            if current:
                start = self._close(current, start, *replicas[expert])
        tied = [p for p in self.params if getattr(p, "tied_embedding", False)]
        if tied:
            start = self._close(tied, start, *replicas[False])
            self.buckets[-1].deferred = True
        self.grad = torch.zeros(start, dtype=torch.float32, device=device)
        shard_size = 0
        for bucket in self.buckets:
            bucket.shard_start = shard_size
            shard_size += bucket.shard_size
        self.grad_shard = torch.zeros(shard_size, dtype=torch.float32, device=device) if shard else None
        self.bucket_of = {}
        for bucket in self.buckets:
            for p in bucket.params:
                a, b = bucket.ranges[p]
                p.main_grad = self.grad[a:b].view_as(p)
                self.bucket_of[p] = bucket
                p.register_post_accumulate_grad_hook(self._on_grad)
        self.sync_now = True

    def _close(self, params: list, start: int, group, rank: int) -> int:
        size = group_size(group)
        bucket = Bucket(params, start, start, group, size, rank)
        offset = start
        for p in params:
            bucket.ranges[p] = (offset, offset + p.numel())
            offset += p.numel()
        bucket.end = start + math.ceil((offset - start) / size) * size if self.shard else offset
        self.buckets.append(bucket)
        return bucket.end

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's slice of a bucket, in flat-buffer coordinates."""
        chunk = bucket.shard_size
        return bucket.start + bucket.rank * chunk, bucket.start + (bucket.rank + 1) * chunk

    # ------------------------------------------------------------------ during backward

    def start_micro_batch(self, last: bool) -> None:
        """Reduce during this backward pass only when it is the step's last micro-batch (with interleaved
        pipeline chunks: each chunk's last backward)."""
        self.sync_now = last

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None
        if self.sync_now:
            bucket = self.bucket_of[p]
            bucket.pending -= 1
            if bucket.pending == 0 and not bucket.deferred:
                self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        data = self.grad[bucket.start:bucket.end]
        if self.grad_scale != 1.0:
            data.mul_(self.grad_scale)
        if bucket.size == 1:
            if self.shard:
                self._shard_view(bucket).copy_(data)
            return
        if self.shard:
            bucket.handle = reduce_scatter_into(self._shard_view(bucket), data, bucket.group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(data, group=bucket.group, async_op=True)

    def _shard_view(self, bucket: Bucket) -> torch.Tensor:
        return self.grad_shard[bucket.shard_start:bucket.shard_start + bucket.shard_size]

    def finish(self) -> None:
        """Complete the reduction: buckets never completed (unused parameters) go now, in bucket order;
        then sequence-parallel weights are summed over TP."""
        for bucket in self.buckets:
            if bucket.deferred and group_size(self.topology.groups["embedding"]) > 1:
                # the first and the last stage each hold a copy of the tied embedding: add their gradients
                dist.all_reduce(self.grad[bucket.start:bucket.end], group=self.topology.groups["embedding"])
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
        if group_size(self.topology.tp_group) > 1:
            views = [v for _, v in self.owned(lambda p: getattr(p, "sequence_parallel", False))]
            if views:
                flat = torch.cat([v.flatten() for v in views])
                dist.all_reduce(flat, group=self.topology.tp_group)
                offset = 0
                for v in views:
                    v.copy_(flat[offset:offset + v.numel()].view_as(v))
                    offset += v.numel()

    def zero(self) -> None:
        """Start a step: empty gradients, every bucket waiting for all of its gradients."""
        self.grad.zero_()
        for bucket in self.buckets:
            bucket.pending, bucket.launched = len(bucket.params), False
        if self.grad_shard is not None:
            self.grad_shard.zero_()

    # ------------------------------------------------------------------ after the reduction

    def owned_ranges(self, select=lambda p: True) -> list[tuple[torch.nn.Parameter, int, int]]:
        """(param, start, end): the flat-buffer ranges of the reduced gradients this rank holds, whole
        parameters without sharding, else the parts of parameters inside this rank's slices."""
        out = []
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket) if self.shard else (bucket.start, bucket.end)
            for p in bucket.params:
                a, b = bucket.ranges[p]
                a, b = max(a, lo), min(b, hi)
                if a < b and select(p):
                    out.append((p, a, b))
        return out

    def reduced_grad(self, p: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        """The reduced gradient of flat range [start, end) (inside one of this rank's slices)."""
        if not self.shard:
            return self.grad[start:end]
        bucket = self.bucket_of[p]
        lo, _ = self.shard_range(bucket)
        return self._shard_view(bucket)[start - lo:end - lo]

    def owned(self, select=lambda p: True) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        return [(p, self.reduced_grad(p, a, b)) for p, a, b in self.owned_ranges(select)]

    def grad_norm(self, select=lambda p: True) -> float:
        """Global L2 norm of the selected gradients, each element counted once over the whole world:
        weights replicated over TP only on TP rank 0 (experts: over ETP, on ETP rank 0), unsharded
        gradients only on rank 0 of their replicas (DP x CP, or EDP for experts), the tied embedding
        only on the first pipeline stage."""
        coords, first_stage = self.topology.coords, self.topology.is_first_stage
        total = torch.zeros((), dtype=torch.float64, device=self.grad.device)
        for p, g in self.owned(select):
            if not self.shard and self.bucket_of[p].rank != 0:
                continue
            if getattr(p, "tied_embedding", False) and not first_stage:
                continue
            tensor_rank = coords["etp"] if getattr(p, "expert", False) else coords["tp"]
            if getattr(p, "partition_dim", None) is not None or tensor_rank == 0:
                total += g.double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return float(total.sqrt())

    def scale(self, coefficient: float, select=lambda p: True) -> None:
        for _, g in self.owned(select):
            g.mul_(coefficient)


class PlainAdamW:
    """AdamW over the model's weights, stepping on the reduced gradients of the buffer."""

    sharded = False

    def __init__(self, buffer: GradBuffer, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 fused: bool):
        self.buffer = buffer
        groups = [
            {"params": [p for p in buffer.params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in buffer.params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def step(self) -> None:
        for p in self.buffer.params:
            p.grad = p.main_grad
        self.inner.step()
        for p in self.buffer.params:  # autograd must not accumulate into the buffer behind the hooks' back
            p.grad = None


class DistributedAdamW:
    """ZeRO-1 AdamW: this rank steps its slice of every bucket (so Adam states are sharded over DP x CP, and
    those of experts over EDP), then the updated slices are all-gathered into the flat parameter buffer the
    model's weights view."""

    sharded = True

    def __init__(self, buffer: GradBuffer, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 fused: bool):
        self.buffer = buffer
        self.params = torch.zeros_like(buffer.grad)  # laid out like the gradients
        self.pieces = []  # (owning param, fp32 master slice, reduced-gradient slice)
        for bucket in buffer.buckets:
            for p in bucket.params:
                a, b = bucket.ranges[p]
                self.params[a:b].copy_(p.detach().flatten())
                p.data = self.params[a:b].view_as(p)
        for p, a, b in buffer.owned_ranges():
            self.pieces.append((p, self.params[a:b], buffer.reduced_grad(p, a, b)))
        groups = [
            {"params": [m for p, m, _ in self.pieces if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [m for p, m, _ in self.pieces if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]] or [{"params": [torch.zeros(0)], "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # a property: loading a state dict replaces the inner list

    def step(self) -> None:
        for _, master, grad in self.pieces:
            master.grad = grad
        self.inner.step()
        buffer = self.buffer
        for bucket in buffer.buckets:
            if bucket.size == 1:
                continue
            lo, hi = buffer.shard_range(bucket)
            all_gather_into(self.params[bucket.start:bucket.end], self.params[lo:hi].clone(), bucket.group)
