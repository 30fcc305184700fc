"""What a checkpoint holds, by name: every tensor under a key that says what it is, never where it lives.

    model.<name>                 the weights (`<name>`: the GPT's own parameter and buffer names, layers by their
                                 global numbers: `model.layers.7.mlp.up.weight`)
    optim.<name>.exp_avg         Adam's moments of that weight, laid out like it
    optim.<name>.exp_avg_sq
    optim.<name>.step            Adam's step count (a scalar)
    ema.<name>                   RLP's EMA teacher (pretrain/objectives/teacher.py), where the run has one
    fp8.<gemm>...                FP8 state (amax histories, TE's extra state), by the GEMM's module name

Each rank gives the boxes it holds of each global tensor (`pretrain/boxes.py`): its tensor-parallel slice,
its experts, the flat part of a weight's Adam moments inside its slices of the distributed optimizer's
buckets. The placement of each parameter (`parallel/placement.py`) says where its local tensor sits in the
global one. Replicas (data-parallel copies, the tied embedding's two copies, norms on every TP rank) give
identical boxes, which DCP writes once. So the keys, and what is saved, do not depend on TP, PP
(interleaved or not), DP, CP, EP, ETP, the optimizer's sharding or its bucket size; loading asks for the
boxes of the loading layout and DCP reads whichever saved boxes overlap them.

The same function builds what is saved and what is loaded into: its tensors are the model's weights and the
optimizer's states themselves (views), so loading fills them in place.
"""

from __future__ import annotations

import math

import torch

from parallel.placement import placement_of
from pretrain.boxes import boxed, flat_boxes, shifted

MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint_state(model: torch.nn.Module, adam: list | None = None, *, fp8=None, teacher=None,
                     staged: bool = False) -> dict:
    """The state DCP saves or loads into (see the module docstring). `adam`: the optimizer's `state_pieces()`
    (None: the weights alone, for checkpoint.init_from). `fp8`: the FP8 feature, whose `state_dict` is nested
    under "fp8"; `teacher`: RLP's EMA teacher model. `staged`: copies in CPU memory instead of views, for a save
    written in the background while training changes the originals."""
    keep = _staged if staged else (lambda t: t.detach())
    state = {}
    for prefix, module in (("model.", model), ("ema.", teacher)):
        if module is not None:
            state.update({prefix + name: _weight(t, keep) for name, t in module.state_dict(keep_vars=True).items()})
    names = {p: name for name, p in model.named_parameters()}
    for p, lo, hi, moments in adam or []:
        key = f"optim.{names[p]}"
        for moment in MOMENTS:
            state[f"{key}.{moment}"] = _range(p, keep(moments[moment]), lo, hi)
        state[f"{key}.step"] = keep(moments["step"])
    if fp8 is not None and (fp8_state := fp8.state_dict()):
        state["fp8"] = _map_tensors(fp8_state, keep)
    return state


def _staged(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _weight(t: torch.Tensor, keep) -> torch.Tensor:
    """A parameter as the box its placement gives; a buffer (the experts' routing bias) is the same on every
    rank and saved whole."""
    if not isinstance(t, torch.nn.Parameter):
        return keep(t)
    where = placement_of(t)
    box = (tuple(s.start for s in where.local_slices()), where.local_shape)
    return boxed([(box, keep(t))], where.global_shape)


def _range(p: torch.nn.Parameter, moment: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The Adam moment of elements [lo, hi) of `p`'s local tensor (shaped like `p`, or flat) as boxes of the
    global tensor: the flat range cut into contiguous boxes of the local tensor, moved to where it sits."""
    where = placement_of(p)
    start = tuple(s.start for s in where.local_slices())
    flat, pieces, at = moment.view(-1), [], 0  # a view: loading must fill the moment itself
    for offsets, sizes in shifted(flat_boxes(where.local_shape, lo, hi), start):
        n = math.prod(sizes)
        pieces.append(((offsets, sizes), flat[at:at + n].view(sizes)))
        at += n
    if at != flat.numel():
        raise ValueError(f"an Adam moment of {flat.numel()} elements for a range of {hi - lo}")
    return boxed(pieces, where.global_shape, region=(start, where.local_shape))
