"""Where each rank sits in the two parallel views, and the process groups it talks over.

Dense (attention) view: TP x CP x DP x PP. Expert (MoE) view: ETP x EP x EDP x PP, over
the same ranks with the same pipeline groups. Ranks are laid out by Megatron-LM's order
string (default `tp-cp-ep-dp-pp`, fastest-varying first) and its masked orthogonal
rank-group algorithm, so a layout here places ranks exactly as Megatron-LM does.

Layers receive the `Topology` in their constructor; nothing reads parallel state from
module globals. Every rank creates every group, in the same order (a requirement of
torch.distributed.new_group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from parallel.errors import FoldtronError


class TopologyError(FoldtronError, ValueError):
    """An impossible parallel layout; the message names the fields and a fix."""


def masked_rank_groups(sizes: list[int], mask: list[bool]) -> list[list[int]]:
    """The rank groups that vary along the masked axes, one group per combination of the unmasked ones.

    `sizes` are the axis sizes in order (fastest first); a rank is the mixed-radix number of its
    coordinates. Inside a group ranks follow the axis order (masked axis 0 fastest).
    """
    strides = [1]
    for size in sizes[:-1]:
        strides.append(strides[-1] * size)
    masked = [(s, st) for s, st, m in zip(sizes, strides, mask) if m]
    unmasked = [(s, st) for s, st, m in zip(sizes, strides, mask) if not m]

    def offsets(axes: list[tuple[int, int]]) -> list[int]:
        out = [0]
        for size, stride in axes:  # earlier axes vary fastest
            out = [base + i * stride for i in range(size) for base in out]
        return out

    return [[group_base + member for member in offsets(masked)] for group_base in offsets(unmasked)]


class RankGenerator:
    """Rank groups of one view, for tokens like 'tp', 'dp-cp' or 'tp-ep' (Megatron's RankGenerator)."""

    def __init__(self, *, tp: int, ep: int, dp: int, pp: int, cp: int, order: str):
        self.sizes = {"tp": tp, "ep": ep, "dp": dp, "pp": pp, "cp": cp}
        self.order = order.split("-")
        self.world_size = tp * ep * dp * pp * cp

    def get_ranks(self, token: str) -> list[list[int]]:
        wanted = set(token.split("-"))
        mask = [axis in wanted for axis in self.order]
        return masked_rank_groups([self.sizes[a] for a in self.order], mask)


@dataclass(frozen=True)
class Sizes:
    """Parallel sizes of a layout; `check` raises TopologyError naming the config fields."""

    world: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # null: tp
    order: str = "tp-cp-ep-dp-pp"
    sp: bool = False  # sequence parallelism (takes effect with tp > 1)

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        return self.world // (self.expert_tp * self.ep * self.pp)

    def check(self) -> None:
        errors = []
        dense = self.tp * self.cp * self.pp
        if self.world % dense:
            errors.append(
                f"parallel.tensor x parallel.context x parallel.pipeline = {self.tp} x {self.cp} x {self.pp} = {dense} "
                f"does not divide the world size {self.world}: choose sizes whose product divides the number of ranks"
            )
        expert = self.expert_tp * self.ep * self.pp
        if self.world % expert:
            errors.append(
                f"parallel.expert_tensor x parallel.expert x parallel.pipeline = {self.expert_tp} x {self.ep} x "
                f"{self.pp} = {expert} does not divide the world size {self.world}"
            )
        axes = self.order.split("-")
        if sorted(axes) != sorted(["tp", "cp", "ep", "dp", "pp"]):
            errors.append(f"parallel.order={self.order!r}: name each of tp, cp, ep, dp, pp once, joined by '-'")
        elif not errors and axes[-1] != "pp" and self.pp > 1 and self.edp != self.dp:
            errors.append(
                f"parallel.order={self.order!r} does not end with pp, which needs equal data-parallel sizes in both "
                f"views (here DP{self.dp}, EDP{self.edp}): end the order with pp"
            )
        if errors:
            raise TopologyError("; ".join(errors))


# Every group a rank may need, in the order every rank creates them.
DENSE_GROUPS = ("tp", "cp", "dp", "dp-cp", "tp-cp", "tp-dp-cp", "pp")
EXPERT_GROUPS = ("ep", "tp", "dp", "tp-ep")


def group_tables(sizes: Sizes) -> dict[str, list[list[int]]]:
    """Every group of the layout: name -> list of rank lists (expert-view groups named ep, etp, edp, tp-ep)."""
    sizes.check()
    dense = RankGenerator(tp=sizes.tp, ep=1, dp=sizes.dp, pp=sizes.pp, cp=sizes.cp, order=sizes.order)
    expert = RankGenerator(tp=sizes.expert_tp, ep=sizes.ep, dp=sizes.edp, pp=sizes.pp, cp=1, order=sizes.order)
    if dense.get_ranks("pp") != expert.get_ranks("pp"):
        raise TopologyError("the pipeline groups of the dense and expert views differ: check parallel.order")
    tables = {name: dense.get_ranks(name) for name in DENSE_GROUPS}
    tables.update({{"tp": "etp", "dp": "edp"}.get(name, name): expert.get_ranks(name) for name in EXPERT_GROUPS})
    tables["embedding"] = [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in tables["pp"]]
    return tables


@dataclass(frozen=True)
class Topology:
    sizes: Sizes
    rank: int
    groups: dict = field(default_factory=dict)  # name -> ProcessGroup (None when a single rank)
    members: dict = field(default_factory=dict)  # name -> the ranks of this rank's group

    @classmethod
    def build(cls, sizes: Sizes, rank: int, *, create_groups: bool = True, timeout=None) -> "Topology":
        """This rank's coordinates and groups. With `create_groups`, torch.distributed must be initialised
        (when the world has more than one rank) and every rank must call this; `timeout` (a timedelta)
        bounds every collective of the groups."""
        groups, members, created = {}, {}, {}
        for name, table in group_tables(sizes).items():
            for ranks in table:
                key = tuple(ranks)
                if create_groups and sizes.world > 1 and len(ranks) > 1 and key not in created:
                    created[key] = dist.new_group(ranks, timeout=timeout)  # views share equal groups
                if rank in ranks:
                    groups[name], members[name] = created.get(key), ranks
        return cls(sizes, rank, groups, members)

    @classmethod
    def single(cls) -> "Topology":
        return cls.build(Sizes(world=1), 0, create_groups=False)

    # sizes and coordinates the layers ask for
    @property
    def tp(self) -> int:
        return self.sizes.tp

    @property
    def cp(self) -> int:
        return self.sizes.cp

    @property
    def dp(self) -> int:
        return self.sizes.dp

    @property
    def pp(self) -> int:
        return self.sizes.pp

    @property
    def sequence_parallel(self) -> bool:
        return self.sizes.sp and self.sizes.tp > 1

    @property
    def tp_rank(self) -> int:
        return self.index_in("tp")

    @property
    def cp_rank(self) -> int:
        return self.index_in("cp")

    @property
    def dp_rank(self) -> int:
        return self.index_in("dp")

    @property
    def pp_rank(self) -> int:
        return self.index_in("pp")

    @property
    def tp_group(self):
        return self.groups["tp"]

    @property
    def cp_group(self):
        return self.groups["cp"]

    @property
    def dp_cp_group(self):
        return self.groups["dp-cp"]

    @property
    def world_size(self) -> int:
        return self.sizes.world

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def index_in(self, group: str) -> int:
        """This rank's position in its group named `group`: its coordinate on that axis, in the dense view (tp,
        cp, dp, pp, dp-cp) or the expert view (ep, etp, edp)."""
        return self.members[group].index(self.rank)

    def layout(self) -> dict:
        """The sizes that shape every rank's state, recorded in each checkpoint: a resume in another layout
        reshards it and reports what changed."""
        s = self.sizes
        return {"world": s.world, "tp": s.tp, "cp": s.cp, "pp": s.pp, "dp": s.dp, "ep": s.ep, "etp": s.expert_tp,
                "order": s.order, "sequence_parallel": self.sequence_parallel}


def describe(sizes: Sizes) -> str:
    """Each rank's coordinates in both views and the groups: what `python -m launch --dry-run` prints."""
    s, tables = sizes, group_tables(sizes)
    lines = [
        f"world {s.world}: dense view TP{s.tp} x CP{s.cp} x DP{s.dp} x PP{s.pp}; "
        f"expert view ETP{s.expert_tp} x EP{s.ep} x EDP{s.edp} x PP{s.pp}; order {s.order}",
        f"{'rank':>5} | {'tp':>3} {'cp':>3} {'dp':>3} {'pp':>3} | {'etp':>3} {'ep':>3} {'edp':>3}",
    ]
    position = {name: {r: g.index(r) for g in table for r in g} for name, table in tables.items()}
    for rank in range(s.world):
        dense = " ".join(f"{position[n][rank]:>3}" for n in ("tp", "cp", "dp", "pp"))
        expert = " ".join(f"{position[n][rank]:>3}" for n in ("etp", "ep", "edp"))
        lines.append(f"{rank:>5} | {dense} | {expert}")
    for name in ("tp", "cp", "dp", "dp-cp", "pp", "ep", "etp", "edp"):
        lines.append(f"{name + ' groups':>12}: " + " ".join(str(g) for g in tables[name]))
    return "\n".join(lines)
