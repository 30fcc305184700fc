"""Activation recomputation: trade compute in the backward pass for activation memory.

`full` keeps only a decoder layer's input and recomputes the whole layer in the backward pass
(non-reentrant `torch.utils.checkpoint`), for the first `model.recompute_layers` layers of each
pipeline stage (all by default). `selective` keeps the outputs of the matrix multiplies and of
attention and recomputes only the cheap element-wise work between them (norms, activations, rotary,
residual adds, GPAS), as torchtitan's selective policy does: most of the memory, little of the
compute. Either way the recomputed forward runs the same operations on the same values, so the
gradients are exactly those without recomputation.

Collectives inside a recomputed region run again in the backward pass (as in Megatron-LM): torch's
collectives write into tensors they are given, which a cache of saved outputs cannot replay, so they
are not saved. Every rank of a group recomputes at the same point of the schedule. Modules with side
effects in their forward (the router's statistics) have a `recomputing` flag, set while a layer is
recomputed, so that they count each micro-batch once.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "selective", "full")

_aten = torch.ops.aten
_SAVED = {  # outputs that `selective` keeps: the expensive ones
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(_aten, "_grouped_mm"):
    _SAVED.add(_aten._grouped_mm.default)
for _name in ("_scaled_mm", "_scaled_grouped_mm"):  # the FP8 GEMMs (parallel/fp8.py)
    if hasattr(_aten, _name):
        _SAVED.add(getattr(_aten, _name).default)


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in _SAVED:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _recomputing(module: torch.nn.Module):
    """Mark the modules under `module` that have side effects in forward as being recomputed."""
    marked = [m for m in module.modules() if hasattr(m, "recomputing")]
    for m in marked:
        m.recomputing = True
    try:
        yield
    finally:
        for m in marked:
            m.recomputing = False


@contextlib.contextmanager
def _all(*managers):
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def _contexts(policy: str, module: torch.nn.Module):
    """(the context of the forward pass, the context of its recomputation in backward)."""
    if policy == "selective":
        saving, replaying = create_selective_checkpoint_contexts(_selective_policy)
        return saving, _all(replaying, _recomputing(module))
    return contextlib.nullcontext(), _recomputing(module)


def run(policy: str, module: torch.nn.Module, function, *args):
    """`function(*args)` (the forward of `module`), with its activations recomputed in backward under `policy`."""
    if policy == "none" or not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False, context_fn=partial(_contexts, policy, module))
