"""Where a parameter lives: how one rank's tensor sits inside the global tensor, and over which ranks it repeats.

Every parameter of a foldtron model gets one `Placement` where it is made (the parallel layers,
the norms, the router, the experts) and the pipeline stage builder refines only its `chunk` and
`tied` fields; everything else reads it back through `placement_of`, which fails loudly on a
parameter that has none instead of falling back to a default. Its readers:

- initialisation draws the global tensor and keeps `local_slices()` of it (same seed, same model,
  whatever the layout);
- gradient buckets keep dense and expert weights apart (`data_group`) and do not span pipeline chunks;
- the reducer sums `partial_over_tp` gradients over TP and the `tied` copies over the embedding group;
- the gradient norm counts each element once (see `parallel/grad_norm.py`);
- `launch --dry-run` counts tensor-parallel and replicated weights (`split_over_tensor_group`);
- `local_slices()` and `describe()` say which rows of which dim of the global tensor a rank holds
  ("rows a..b of dim d of a tensor of global shape S"), expert stacks included: the boxes a checkpoint
  saves and loads (pretrain/checkpoint_state.py). A weight split over a group of one rank keeps its split (of size 1):
  it is still a tensor-parallel weight, whole on that rank.

Group names are the `Topology`'s ("tp", "etp", "ep", "dp-cp", "edp").
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, replace
from typing import Optional

import torch

_ATTRIBUTE = "_foldtron_placement"


@dataclass(frozen=True)
class Split:
    """Dimension `dim` of the global tensor cut into `size` equal pieces over group `group`; this rank holds
    piece `rank`."""

    dim: int
    group: str
    _: KW_ONLY
    rank: int
    size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of a group of {self.size}")


@dataclass(frozen=True)
class Placement:
    """How one parameter is laid out over the ranks.

    global_shape: the shape of the whole tensor (all ranks' pieces together).
    splits: the dimensions cut over a group (none: this rank holds it whole).
    tensor_group: the tensor-parallel group of the weight ("tp"; "etp" for experts). A weight that is
        not split over it is replicated on it.
    data_group: the replicas whose gradients are averaged ("dp-cp"; "edp" for experts).
    partial_over_tp: a replicated weight that sees only this rank's part of the work (its sequence shard
        under sequence parallelism; its own heads, for the per-head q/k norms), so its gradient is a partial
        sum over TP.
    tied: one of the two copies of the tied embedding table (first and last pipeline stage).
    chunk: the pipeline chunk (virtual stage of this rank) whose backward pass produces the gradient.
    """

    global_shape: tuple[int, ...]
    splits: tuple[Split, ...] = ()
    _: KW_ONLY
    tensor_group: str = "tp"
    data_group: str = "dp-cp"
    partial_over_tp: bool = False
    tied: bool = False
    chunk: int = 0

    @property
    def expert(self) -> bool:
        return self.data_group == "edp"

    @property
    def split_over_tensor_group(self) -> bool:
        """A tensor-parallel weight (each rank of its tensor group holds its own piece), else replicated there."""
        return any(s.group == self.tensor_group for s in self.splits)

    @property
    def experts(self) -> range:
        """The global numbers of the experts this rank holds, stacked along dim 0."""
        (ep,) = [s for s in self.splits if s.group == "ep"] or [None]
        if ep is None:
            raise ValueError(f"{self.describe()} is not a stack of experts")
        return self.span(ep)

    def span(self, split: Split) -> range:
        length = self.global_shape[split.dim] // split.size
        return range(split.rank * length, (split.rank + 1) * length)

    def local_slices(self) -> tuple[slice, ...]:
        """This rank's piece as indices into the global tensor."""
        out = [slice(0, n) for n in self.global_shape]
        for split in self.splits:
            piece = self.span(split)
            out[split.dim] = slice(piece.start, piece.stop)
        return tuple(out)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.local_slices())

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    def describe(self) -> str:
        """'rows 4..8 of dim 0 (ep), rows 0..32 of dim 1 (etp) of a tensor of global shape (8, 64, 32)'."""
        shape = tuple(self.global_shape)
        if not self.splits:
            return f"all of a tensor of global shape {shape}"
        parts = [f"rows {self.span(s).start}..{self.span(s).stop} of dim {s.dim} ({s.group})" for s in self.splits]
        return ", ".join(parts) + f" of a tensor of global shape {shape}"


def split(dim: int, group: str, *, rank: int, size: int) -> tuple[Split, ...]:
    """Dimension `dim` split over `group` (of `size` ranks; with one rank the tensor is whole on it)."""
    return (Split(dim, group, rank=rank, size=size),)


def place(param: torch.nn.Parameter, placement: Placement) -> torch.nn.Parameter:
    """Attach `placement` to a new parameter (once) and check that it describes the local tensor."""
    if hasattr(param, _ATTRIBUTE):
        raise ValueError("this parameter already has a placement: refine it with restage()")
    if tuple(param.shape) != placement.local_shape:
        raise ValueError(f"a parameter of shape {tuple(param.shape)} cannot hold {placement.describe()}")
    setattr(param, _ATTRIBUTE, placement)
    return param


def replicated(param: torch.nn.Parameter, *, partial_over_tp: bool = False) -> torch.nn.Parameter:
    """A weight every rank of the stage holds whole (norms, GPAS gates, the router)."""
    return place(param, Placement(tuple(param.shape), partial_over_tp=partial_over_tp))


def placement_of(param: torch.nn.Parameter) -> Placement:
    try:
        return getattr(param, _ATTRIBUTE)
    except AttributeError:
        raise ValueError(
            f"a parameter of shape {tuple(param.shape)} has no placement: give it one with parallel.placement.place "
            "where it is created"
        ) from None


def restage(param: torch.nn.Parameter, *, chunk: int, tied: Optional[bool] = None) -> None:
    """The pipeline stage builder's refinement: which chunk's backward produces the gradient, and whether the
    tensor is a copy of the tied embedding."""
    current = placement_of(param)
    setattr(param, _ATTRIBUTE, replace(current, chunk=chunk, tied=current.tied if tied is None else tied))
