"""The optimizers over the reduced gradients: plain AdamW, and ZeRO-1 AdamW sharded over the data groups.

Both step on what `GradReducer` holds after `finish()`; neither changes the model behind the
caller's back. The distributed optimizer needs the weights to live in one flat buffer laid out
like the gradients (so that the slice it steps is a slice of both): the caller makes them so with
`adopt_flat_storage`, explicitly, and passes the buffer in.

For checkpoints both give their state as named parts (`state_parts`), so that the checkpoint code
knows which ranks hold equal copies without looking inside the optimizer:
- "dense" / "experts" (plain AdamW): the states of dense and of expert weights, equal on every rank
  of the weights' data group (DP x CP; EDP);
- "own" (distributed): this rank's slices only.

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
from parallel.placement import placement_of


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

    def _indexed_state(self) -> dict:
        """The inner state in torch AdamW's layout, keyed by the tensor's index as a string."""
        state = self.inner.state_dict()
        if self.impl == "apex":
            state = apex_backend.to_torch_state(state)
        return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}

    def _load(self, state: dict, param_groups: list) -> None:
        """Load a state in torch AdamW's layout (written by either implementation)."""
        whole = {"state": {int(k): v for k, v in state.items()}, "param_groups": param_groups}
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
        stepped = [t for group in self.inner.param_groups for t in group["params"]]
        self.expert_indices = {i for i, t in enumerate(stepped) if placement_of(t).expert}

    def step(self) -> None:
        for p in self.params:
            p.grad = p.main_grad
        self.inner.step()
        for p in self.params:  # autograd must not accumulate into the buffer behind the hooks' back
            p.grad = None

    def state_parts(self) -> dict[str, dict]:
        whole = self._indexed_state()
        expert = {str(i) for i in self.expert_indices}
        parts = {"dense": {**whole, "state": {k: v for k, v in whole["state"].items() if k not in expert}}}
        if expert:
            parts["experts"] = {"state": {k: v for k, v in whole["state"].items() if k in expert}}
        return parts

    def load_state_parts(self, parts: dict[str, dict]) -> None:
        state = {**parts["dense"]["state"], **parts.get("experts", {"state": {}})["state"]}
        self._load(state, parts["dense"]["param_groups"])


class DistributedAdamW(_AdamW):
    """ZeRO-1 AdamW: this rank steps its slice of every bucket (so Adam states are sharded over DP x CP, and
    those of experts over EDP), then the updated slices are all-gathered into the flat parameter buffer
    (from `adopt_flat_storage`) that the model's weights view."""

    def __init__(self, reducer: GradReducer, flat_params: torch.Tensor, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, fused: bool, impl: str = "torch"):
        if flat_params.numel() != reducer.layout.size:
            raise ValueError("flat_params must come from adopt_flat_storage over the reducer's layout")
        self.reducer, self.flat_params, self.impl = reducer, flat_params, impl
        self.pieces = [(p, flat_params[a:b], reducer.reduced_grad(p, a, b)) for p, a, b in reducer.owned_ranges()]
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

    def state_parts(self) -> dict[str, dict]:
        return {"own": self._indexed_state()}

    def load_state_parts(self, parts: dict[str, dict]) -> None:
        self._load(parts["own"]["state"], parts["own"]["param_groups"])
