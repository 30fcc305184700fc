"""The optimizers over the reduced gradients: plain AdamW, and ZeRO-1 AdamW sharded over the data groups.

Both step on what `GradReducer` holds after `finish()`; neither changes the model behind the
caller's back. The distributed optimizer needs the weights to live in one flat buffer laid out
like the gradients (so that the slice it steps is a slice of both): the caller makes them so with
`adopt_flat_storage`, explicitly, and passes the buffer in.

For checkpoints both give their state by the weight it belongs to (`state_pieces`): for every tensor the
inner optimizer steps, the model weight, the flat range of the weight's local tensor that it covers (all of
it for plain AdamW; the part inside this rank's bucket slices for the distributed one) and its Adam state.
The checkpoint code turns the range into boxes of the global tensor (pretrain/checkpoint_state.py), so
that a checkpoint of either optimizer, of any layout, loads into either.

The inner optimizer is torch's AdamW (`impl="torch"`, the reference) or NVIDIA apex's FusedAdam (`impl="apex"`,
parallel/apex_backend.py); either way the states are given and taken in torch AdamW's layout, so a checkpoint
does not depend on which one wrote it.
"""

from __future__ import annotations

import torch

from parallel import apex_backend
from parallel.buckets import BucketLayout
from parallel.collectives import all_gather_into
from parallel.data_parallel import GradReducer


def adopt_flat_storage(layout: BucketLayout, device: torch.device) -> torch.Tensor:
    """Move every parameter's data into one flat fp32 buffer laid out like the gradients (`param.data` becomes a
    view of it) and return the buffer; the values are unchanged."""
    flat = torch.zeros(layout.size, dtype=torch.float32, device=device)
    for _, p, a, b in layout.places():
        flat[a:b].copy_(p.detach().flatten())
        p.data = flat[a:b].view_as(p)
    return flat


def _decay_groups(pairs: list, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, GPAS gates or biases). `pairs`: (model weight, tensor to step)."""
    groups = [
        {"params": [t for p, t in pairs if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [t for p, t in pairs if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


IMPLS = ("torch", "apex")
# how torch's AdamW runs its step, not what it has learnt: after loading a checkpoint these stay as this run chose
_HOW_IT_RUNS = ("foreach", "fused", "capturable", "differentiable")


def _inner(groups: list[dict], *, impl: str, lr: float, betas: tuple[float, float], eps: float,
           fused: bool) -> torch.optim.Optimizer:
    """The optimizer that steps: torch's AdamW (fused or not), or apex's FusedAdam in AdamW mode (always fused).
    The config's `auto` is not taken here: the trainer resolves it for its device (the same on every rank)."""
    if impl not in IMPLS:
        raise ValueError(f"no optimizer implementation {impl!r}: one of {IMPLS}")
    if impl == "apex":
        return apex_backend.fused_adam(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


class _AdamW:
    """What both optimizers share: the inner optimizer, its learning rate and its checkpoint state."""

    inner: torch.optim.Optimizer
    impl: str

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # a property: loading a state dict replaces the inner list

    def materialize_state(self) -> None:
        """Give every tensor its Adam state (a step with zero gradients and learning rate 0 changes no weight),
        so that a checkpoint can be loaded into the state tensors in place."""
        if self.inner.state:
            return
        tensors = [t for group in self.inner.param_groups for t in group["params"]]
        lrs = [g["lr"] for g in self.inner.param_groups]
        for group in self.inner.param_groups:
            group["lr"] = 0.0
        for t in tensors:
            t.grad = torch.zeros_like(t)
        self.inner.step()
        for group, lr in zip(self.inner.param_groups, lrs):
            group["lr"] = lr
        for t in tensors:
            t.grad = None

    def _ranges(self) -> list:
        """For each tensor the inner optimizer steps, in its order: (model weight, lo, hi), the flat range of the
        weight's local tensor it covers; None for a placeholder that holds no weight."""
        raise NotImplementedError

    def _torch_state(self) -> dict:
        """The inner state dict in torch AdamW's layout (apex's FusedAdam converted)."""
        state = self.inner.state_dict()
        return apex_backend.to_torch_state(state) if self.impl == "apex" else state

    def state_pieces(self) -> list[tuple[torch.nn.Parameter, int, int, dict]]:
        """(weight, lo, hi, state) for every stepped tensor that holds a weight: the flat range [lo, hi) of the
        weight's local tensor, and its state in torch AdamW's layout ("exp_avg", "exp_avg_sq": tensors of the
        range, shaped like the weight or flat; "step"). Call `materialize_state` first. The tensors are the
        optimizer's own (torch) or its converted copies (apex): load into them in place, then call
        `load_state_pieces` with the same list."""
        state = self._torch_state()["state"]
        return [(p, lo, hi, state[i]) for i, where in enumerate(self._ranges()) if where is not None and i in state
                for p, lo, hi in [where]]

    def load_state_pieces(self, pieces: list[tuple[torch.nn.Parameter, int, int, dict]]) -> None:
        """Take the states of `state_pieces` (filled in place); the hyperparameters stay this run's (the learning
        rate is a function of the step, the rest comes from the config)."""
        current = self._torch_state()
        by_range = {(id(p), lo, hi): st for p, lo, hi, st in pieces}
        state = {i: by_range[(id(where[0]), where[1], where[2])] if where is not None else current["state"][i]
                 for i, where in enumerate(self._ranges())}
        whole = {"state": state, "param_groups": current["param_groups"]}
        if self.impl == "apex":
            self.inner.load_state_dict(apex_backend.from_torch_state(whole))
            return
        how = [{k: g[k] for k in _HOW_IT_RUNS if k in g} for g in self.inner.param_groups]
        self.inner.load_state_dict(whole)
        for group, kept in zip(self.inner.param_groups, how):
            group.update(kept)  # a checkpoint of FusedAdam (or of an unfused run) must not turn fusion off


class PlainAdamW(_AdamW):
    """AdamW over the model's weights, stepping on the reduced gradients (`main_grad`) of the reducer."""

    def __init__(self, reducer: GradReducer, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, fused: bool, impl: str = "torch"):
        self.params, self.impl = list(reducer.layout.params), impl
        groups = _decay_groups([(p, p) for p in self.params], weight_decay)
        self.inner = _inner(groups, impl=impl, lr=lr, betas=betas, eps=eps, fused=fused)

    def step(self) -> None:
        for p in self.params:
            p.grad = p.main_grad
        self.inner.step()
        for p in self.params:  # autograd must not accumulate into the buffer behind the hooks' back
            p.grad = None

    def _ranges(self) -> list:
        return [(t, 0, t.numel()) for group in self.inner.param_groups for t in group["params"]]


class DistributedAdamW(_AdamW):
    """ZeRO-1 AdamW: this rank steps its slice of every bucket (so Adam states are sharded over DP x CP, and
    those of experts over EDP), then the updated slices are all-gathered into the flat parameter buffer
    (from `adopt_flat_storage`) that the model's weights view."""

    def __init__(self, reducer: GradReducer, flat_params: torch.Tensor, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, fused: bool, impl: str = "torch"):
        if flat_params.numel() != reducer.layout.size:
            raise ValueError("flat_params must come from adopt_flat_storage over the reducer's layout")
        self.reducer, self.flat_params, self.impl = reducer, flat_params, impl
        owned = reducer.owned_ranges()
        self.pieces = [(p, flat_params[a:b], reducer.reduced_grad(p, a, b)) for p, a, b in owned]
        starts = {p: a for _, p, a, _ in reducer.layout.places()}
        # each master slice -> (its weight, the range of the weight's local tensor it covers)
        self.ranges_of = {id(master): (p, a - starts[p], b - starts[p])
                          for (p, master, _), (_, a, b) in zip(self.pieces, owned)}
        # a rank may own no slice of any weight: the optimizers need a tensor to hold the hyperparameters (on the
        # weights' device: FusedAdam's kernels take CUDA tensors only; alone in its group, its being empty is harmless)
        groups = _decay_groups([(p, master) for p, master, _ in self.pieces], weight_decay) or [
            {"params": [torch.zeros(0, device=flat_params.device)], "weight_decay": 0.0}]
        self.inner = _inner(groups, impl=impl, lr=lr, betas=betas, eps=eps, fused=fused)

    def step(self) -> None:
        for _, master, grad in self.pieces:
            master.grad = grad
        self.inner.step()
        for bucket in self.reducer.layout.buckets:
            if bucket.replicas == 1:
                continue
            lo, hi = self.reducer.shard_range(bucket)
            all_gather_into(self.flat_params[bucket.start:bucket.end], self.flat_params[lo:hi].clone(),
                            self.reducer.group_of(bucket))

    def _ranges(self) -> list:
        return [self.ranges_of.get(id(t)) for group in self.inner.param_groups for t in group["params"]]
