"""The MoE token dispatcher: takes each (token, expert) pair to the ranks that compute that expert, and the
results back to the token.

Experts are split over the EP group contiguously (EP rank e owns experts [e·L, (e+1)·L), L = E / EP); under
ETP > 1 each expert is split further over the ETP group, whose ranks all compute on the same tokens and
produce partial sums. The dispatcher sees ETP x EP (group "tp-ep") as one pool of ranks with distinct tokens.

All-to-all dispatcher (the main path). Dispatch:
  1. all-gather of every rank's per-expert token counts [E] over "tp-ep": every split size below follows
     from this table, with no further exchange;
  2. a local permute of the pairs, expert-major, which also groups them by destination EP rank;
  3. all-to-all-v over "ep" of the tokens, then of their probabilities;
  4. all-gather-v over "etp" of both, so that the ETP peers hold the same tokens;
  5. a local sort of the chunks from [ETP rank][EP rank][local expert] to [local expert][ETP rank][EP rank].
Combine runs the reverse: unsort, reduce-scatter-v over "etp" (which also sums the ETP partial outputs),
all-to-all-v over "ep" with the splits swapped, and a scatter-add of each token's expert outputs.

All-gather dispatcher (a simple reference that moves far more data): all-gather over "tp-ep" of the token
counts (with the per-expert counts), then the tokens, the probabilities and the routing map; keep the local
experts' pairs. Combine scatter-adds into the gathered tokens and reduce-scatters them over "tp-ep" back to
their ranks.

Host syncs: the collectives take their split sizes as Python ints, so the count table of step 1 must reach
the host. On a GPU that is the one device-to-host copy of a dispatch (non-blocking, into page-locked memory,
`parallel/transfers.py`), started as soon as the table exists and waited for where the first size is used;
the pairs are sorted on the device meanwhile, without `nonzero` (which reads its count back), and the index
tensors built from the counts are made on the device. Combine and backward reuse the sizes: no copy. So a
layer's forward waits for the device once (twice with full or selective recomputation, which dispatches
again in backward), and only for the work queued before its counts, not for the rest of the layer.

Backward runs the adjoint collectives (all-to-all with swapped splits, all-gather <-> reduce-scatter). Every
rank of a group issues the same collectives in the same order, whatever its counts, zero included.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from parallel.collectives import all_gather_rows, all_gather_v, all_to_all_v, group_size, reduce_scatter_v
from parallel.topology import Topology
from parallel.transfers import HostCopy


def routed_slots(routing_map: torch.Tensor) -> torch.Tensor:
    """The flat expert-major slots (expert * T + token) of the routing map [T, E], routed pairs first, in slot
    order (a stable sort of "not routed"): how many pairs there are is not needed, so there is no host sync
    (`nonzero` would read the count back). The first `count` entries are the pairs (see `pairs_by_expert`)."""
    return torch.argsort((~routing_map.T).flatten().to(torch.uint8), stable=True)


def pairs_by_expert(slots: torch.Tensor, *, count: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, token) indices of the `count` routed pairs of `routed_slots`, expert-major and in token order
    within an expert, as `routing_map.T.nonzero(as_tuple=True)` gives them; `count` comes from the host."""
    pairs = slots[:count]
    return pairs // num_tokens, pairs % num_tokens


def chunk_reorder(sizes: torch.Tensor, dims: tuple[int, ...], *, total: int) -> torch.Tensor:
    """Row index that takes rows stored as chunks of `sizes` (a grid of chunk lengths, chunks in row-major
    order) to the chunk order of `sizes.permute(dims)`, each chunk's rows kept in order. `total`, the number
    of rows (sizes.sum(), known on the host), makes it sync-free on a GPU, where `sizes` lives."""
    starts = (sizes.flatten().cumsum(0) - sizes.flatten()).view(sizes.shape).permute(dims).flatten()
    lengths = sizes.permute(dims).flatten()
    ends = lengths.cumsum(0)
    within = torch.arange(total, device=sizes.device) - torch.repeat_interleave(ends - lengths, lengths,
                                                                                output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + within


class TokenDispatcher(ABC):
    """dispatch: this rank's tokens -> the pairs of its local experts gathered from the whole ETP x EP group,
    sorted by local expert. combine: the experts' outputs -> the tokens' own rows, summed over each token's
    experts. A dispatch keeps what the next combine needs: one pair of calls at a time."""

    def __init__(self, num_experts: int, topology: Topology):
        ep = topology.sizes.ep
        if num_experts % ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep
        self.first_expert = topology.index_in("ep") * self.num_local_experts

    @abstractmethod
    def dispatch(self, tokens: torch.Tensor, probs: torch.Tensor,
                 routing_map: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """tokens [T, H], probs [T, E] (zero where not routed), routing_map [T, E] bool ->
        (expert_tokens [N, H], tokens_per_expert [L], expert_probs [N]); expert_probs[i] is the
        probability of the pair of row i, so that the experts can weight their outputs."""

    @abstractmethod
    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """expert_output [N, H] (rows as dispatched, probabilities applied) -> [T, H]."""

    def _check(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        shape = (tokens.shape[0], self.num_experts)
        if probs.shape != shape or routing_map.shape != shape or routing_map.dtype != torch.bool:
            raise ValueError(f"expected probs and a bool routing_map of shape {shape}, got {tuple(probs.shape)} "
                             f"and {routing_map.dtype} {tuple(routing_map.shape)}")


@dataclass
class _AllToAllPlan:
    num_tokens: int
    token_idx: torch.Tensor  # the token of each permuted pair, for the scatter-add
    input_splits: list[int]  # pairs this rank sends to each EP peer
    output_splits: list[int]  # pairs it receives from each EP peer
    etp_sizes: list[int]  # pairs each ETP peer holds after its all-to-all
    restore: Optional[torch.Tensor]  # row index undoing the sort by local expert (None when L = 1)


class AllToAllDispatcher(TokenDispatcher):
    """Moves only the routed pairs, each to the EP rank of its expert (and its ETP peers): the main path."""

    def __init__(self, num_experts: int, topology: Topology):
        super().__init__(num_experts, topology)
        self.ep_group, self.etp_group = topology.groups["ep"], topology.groups["etp"]
        self.tp_ep_group = topology.groups["tp-ep"]
        self.ep_rank, self.etp_rank = topology.index_in("ep"), topology.index_in("etp")
        members, rank = topology.members, topology.rank
        # A rank number is linear in its coordinates, so the rank at (EP index e, ETP index t) is
        # ep_members[e] + etp_members[t] - rank; `position[e, t]` is its place in the "tp-ep" group.
        self.position = torch.tensor([[members["tp-ep"].index(e + t - rank) for t in members["etp"]]
                                      for e in members["ep"]])
        self._position_on: dict[torch.device, torch.Tensor] = {}  # `position` on the device, copied once
        self.plan: Optional[_AllToAllPlan] = None

    def dispatch(self, tokens, probs, routing_map):
        """The split sizes are Python ints, so the count table must reach the host: on a GPU that is this
        layer's one device-to-host copy (per direction: the backward reuses the plan), started as soon as
        the table exists and waited for only where the first size is used, after the device work that needs
        none (sorting the pairs) is queued. Nothing else here waits for the device."""
        self._check(tokens, probs, routing_map)
        L, local = self.num_local_experts, slice(self.first_expert, self.first_expert + self.num_local_experts)
        counts = all_gather_rows(routing_map.sum(0)[None], [1] * group_size(self.tp_ep_group), self.tp_ep_group)
        on_host = HostCopy(counts)
        slots = routed_slots(routing_map)
        # table[e, t, x]: tokens the rank at (EP e, ETP t) routes to expert x; mine [EP, ETP, L]: the pairs for
        # my local experts (the host's copy for the split sizes, the device's for the reordering below)
        table = on_host.wait()[self.position]
        mine = table[:, :, local]
        input_splits = table[self.ep_rank, self.etp_rank].view(-1, L).sum(1).tolist()
        output_splits = mine[:, self.etp_rank].sum(1).tolist()
        etp_sizes = mine.sum((0, 2)).tolist()
        tokens_per_expert = mine.sum((0, 1)).tolist()

        expert_idx, token_idx = pairs_by_expert(slots, count=sum(input_splits), num_tokens=tokens.shape[0])
        x, p = tokens[token_idx], probs[token_idx, expert_idx]
        x = all_to_all_v(x, output_splits, input_splits, self.ep_group)
        p = all_to_all_v(p, output_splits, input_splits, self.ep_group)
        x = all_gather_v(x, etp_sizes, self.etp_group)
        p = all_gather_v(p, etp_sizes, self.etp_group)
        restore = None
        if L > 1:  # rows arrive as [ETP rank][EP rank][local expert]: make each expert's rows contiguous
            on_device = counts[self._position(counts.device)][:, :, local]
            order = chunk_reorder(on_device.permute(1, 0, 2), (2, 0, 1), total=sum(etp_sizes))
            x, p, restore = x[order], p[order], order.argsort()
        self.plan = _AllToAllPlan(tokens.shape[0], token_idx, input_splits, output_splits, etp_sizes, restore)
        return x, tokens_per_expert, p

    def _position(self, device: torch.device) -> torch.Tensor:
        """`position` on `device`: a host-to-device copy at the first dispatch only."""
        if device not in self._position_on:
            self._position_on[device] = self.position.to(device)
        return self._position_on[device]

    def combine(self, expert_output):
        plan = self.plan
        y = expert_output if plan.restore is None else expert_output[plan.restore]
        y = reduce_scatter_v(y, plan.etp_sizes, self.etp_group)
        y = all_to_all_v(y, plan.input_splits, plan.output_splits, self.ep_group)
        return y.new_zeros((plan.num_tokens,) + y.shape[1:]).index_add(0, plan.token_idx, y)


@dataclass
class _AllGatherPlan:
    sizes: list[int]  # tokens of each rank of "tp-ep"
    token_idx: torch.Tensor  # the gathered token of each local pair


class AllGatherDispatcher(TokenDispatcher):
    """Every rank of ETP x EP sees every token of the group and keeps its experts' pairs: simple, and a reference
    for the all-to-all path, but it moves (ETP·EP - 1) copies of all the tokens."""

    def __init__(self, num_experts: int, topology: Topology):
        super().__init__(num_experts, topology)
        self.group = topology.groups["tp-ep"]
        self.plan: Optional[_AllGatherPlan] = None

    def dispatch(self, tokens, probs, routing_map):
        """One device-to-host copy per layer, as in the all-to-all path: each rank's token count and per-expert
        counts are gathered in one table, from which both the sizes of the gathers and the tokens per local
        expert follow (the latter equal the gathered routing map's column sums)."""
        self._check(tokens, probs, routing_map)
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        # [this rank's tokens, its tokens per expert]: filled on the device (torch.full), no host-to-device copy
        counts = torch.cat([torch.full((1,), tokens.shape[0], dtype=torch.long, device=tokens.device),
                            routing_map.sum(0)])
        table = HostCopy(all_gather_rows(counts[None], [1] * group_size(self.group), self.group)).wait()
        sizes = table[:, 0].tolist()
        tokens_per_expert = table[:, 1:][:, local].sum(0).tolist()
        tokens = all_gather_v(tokens, sizes, self.group)
        probs = all_gather_v(probs, sizes, self.group)
        routing_map = all_gather_rows(routing_map.to(torch.uint8), sizes, self.group).bool()
        slots = routed_slots(routing_map[:, local])
        expert_idx, token_idx = pairs_by_expert(slots, count=sum(tokens_per_expert), num_tokens=sum(sizes))
        self.plan = _AllGatherPlan(sizes, token_idx)
        return tokens[token_idx], tokens_per_expert, probs[:, local][token_idx, expert_idx]

    def combine(self, expert_output):
        plan = self.plan
        y = expert_output.new_zeros((sum(plan.sizes),) + expert_output.shape[1:])
        return reduce_scatter_v(y.index_add(0, plan.token_idx, expert_output), plan.sizes, self.group)


DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}


def build_dispatcher(kind: str, num_experts: int, topology: Topology) -> TokenDispatcher:
    if kind not in DISPATCHERS:
        raise ValueError(f"unknown token dispatcher {kind!r}: choose one of {', '.join(DISPATCHERS)}")
    return DISPATCHERS[kind](num_experts, topology)
