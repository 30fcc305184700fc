"""The MoE token dispatchers and the uneven collectives under them, on 8 gloo ranks.

One start of the ranks runs every case: ETP in {1, 2} x EP in {1, 2, 4} x local experts in {1, 2}, both
dispatchers, and five routings. The ranks return what they saw; the checks here compare it with what
follows from all ranks' routing maps, which every process can recompute from the seeds. Each token
carries a unique id in its first feature so that a dispatched row can be traced back to its token.
"""

import itertools

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks
from parallel.expert_parallel import build_dispatcher
from parallel.topology import Sizes, Topology

WORLD, TOKENS, HIDDEN, TOP_K, CAPACITY = 8, 6, 4, 2, 3
ORDER = "tp-cp-ep-dp-pp"
# (ETP, EP, local experts, rank order); the last layout numbers EP before ETP inside the "tp-ep" group
LAYOUTS = [(etp, ep, local, ORDER) for etp in (1, 2) for ep in (1, 2, 4) for local in (1, 2)]
LAYOUTS.append((2, 2, 2, "ep-tp-cp-dp-pp"))
DISPATCHERS = ("alltoall", "allgather")
# dropless: top-k, probs 1/k; dropping: some pairs removed; padded: every expert exactly CAPACITY tokens,
# some of them fillers of prob 0; weighted: top-k with random probs; empty: rank 0 routes nothing and
# the last EP rank's experts receive nothing (with EP1 that is every expert: nothing moves at all)
ROUTINGS = ("dropless", "dropping", "padded", "weighted", "empty")
CASES = [(name, *layout, routing) for name, layout, routing in itertools.product(DISPATCHERS, LAYOUTS, ROUTINGS)]


def case_id(case) -> str:
    name, etp, ep, local, order, kind = case
    return f"{name}-etp{etp}-ep{ep}-local{local}-{kind}" + ("" if order == ORDER else f"-{order}")


def routing(kind: str, rank: int, num_experts: int, ep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's routing map [T, E] and probs [T, E] (float64, zero where not routed)."""
    g = torch.Generator().manual_seed(rank + 100 * num_experts + 10_000 * ROUTINGS.index(kind))
    top_k = min(TOP_K, num_experts)
    routing_map = torch.zeros(TOKENS, num_experts, dtype=torch.bool)
    if kind == "padded":
        for expert in range(num_experts):
            routing_map[torch.randperm(TOKENS, generator=g)[:CAPACITY], expert] = True
        real = torch.rand(TOKENS, num_experts, generator=g) < 0.7
        return routing_map, torch.where(routing_map & real, 1.0 / top_k, 0.0).double()
    allowed = num_experts - (num_experts // ep if kind == "empty" else 0)
    if not (kind == "empty" and rank == 0):
        for t in range(TOKENS):
            routing_map[t, torch.randperm(allowed, generator=g)[:top_k]] = True
    if kind == "dropping":
        routing_map &= torch.rand(TOKENS, num_experts, generator=g) < 0.5
    if kind == "weighted":
        return routing_map, torch.where(routing_map, 0.1 + torch.rand(TOKENS, num_experts, generator=g), 0.0).double()
    return routing_map, torch.where(routing_map, 1.0 / top_k, 0.0).double()


def run_case(dispatcher, topology: Topology, kind: str, rank: int) -> dict:
    """One dispatch, identity experts (times the probs, divided by ETP: a row-parallel partial), combine, backward."""
    routing_map, probs = routing(kind, rank, dispatcher.num_experts, topology.sizes.ep)
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    tokens[:, 0] = rank * TOKENS + torch.arange(TOKENS)  # the token's id
    grad_out = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    tokens.requires_grad_()
    probs.requires_grad_()

    expert_tokens, tokens_per_expert, expert_probs = dispatcher.dispatch(tokens, probs, routing_map)
    output = dispatcher.combine(expert_tokens * expert_probs[:, None] / topology.sizes.expert_tp)
    (output * grad_out).sum().backward()

    received = []  # (token id, global expert, prob) of every dispatched row
    for local, rows in enumerate(torch.arange(len(expert_probs)).split(tokens_per_expert)):
        received += [(int(expert_tokens[i, 0]), dispatcher.first_expert + local, float(expert_probs[i])) for i in rows]
    return {"tokens": tokens.detach(), "grad_out": grad_out, "output": output.detach(), "grad_tokens": tokens.grad,
            "grad_probs": probs.grad, "tokens_per_expert": tokens_per_expert, "received": sorted(received),
            "group": topology.members["tp-ep"], "first_expert": dispatcher.first_expert}


def uneven_collectives(rank: int, world: int) -> dict:
    """all_to_all_v, all_gather_v and reduce_scatter_v with uneven sizes (zero included) and their backward:
    (got, expected) pairs. Every rank's inputs are seeded by its rank, so each rank computes the expected."""
    from parallel.collectives import all_gather_v, all_to_all_v, reduce_scatter_v

    group = dist.new_group(list(range(world)))
    sizes = [(3 * r) % 5 for r in range(world)]  # 0 3 1 4 2 0 3 1
    offsets = [sum(sizes[:r]) for r in range(world)]

    def data(seed: int, rows: int) -> torch.Tensor:
        return torch.randn(rows, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    out = {}
    x = data(rank, sizes[rank]).requires_grad_()
    gathered = all_gather_v(x, sizes, group)
    (gathered * data(100 + rank, sum(sizes))).sum().backward()
    out["all_gather_v"] = gathered.detach(), torch.cat([data(r, sizes[r]) for r in range(world)])
    everyone_grad = sum(data(100 + r, sum(sizes)) for r in range(world))
    out["all_gather_v backward"] = x.grad, everyone_grad[offsets[rank]:offsets[rank] + sizes[rank]]

    x = data(200 + rank, sum(sizes)).requires_grad_()
    scattered = reduce_scatter_v(x, sizes, group)
    (scattered * data(300 + rank, sizes[rank])).sum().backward()
    everyone = sum(data(200 + r, sum(sizes)) for r in range(world))
    out["reduce_scatter_v"] = scattered.detach(), everyone[offsets[rank]:offsets[rank] + sizes[rank]]
    out["reduce_scatter_v backward"] = x.grad, torch.cat([data(300 + r, sizes[r]) for r in range(world)])

    splits = [[(src + 2 * dst) % 3 for dst in range(world)] for src in range(world)]  # rows src sends dst
    x = data(400 + rank, sum(splits[rank])).requires_grad_()
    received = all_to_all_v(x, [splits[src][rank] for src in range(world)], splits[rank], group)
    (received * 2).sum().backward()
    blocks = [data(400 + src, sum(splits[src])).split(splits[src])[rank] for src in range(world)]
    out["all_to_all_v"] = received.detach(), torch.cat(blocks)
    out["all_to_all_v backward"] = x.grad, torch.full_like(x, 2.0)
    return out


def sweep(rank: int, world: int) -> dict:
    results = {"collectives": uneven_collectives(rank, world)}
    for etp, ep, local, order in LAYOUTS:
        topology = Topology.build(Sizes(world=world, ep=ep, etp=etp, order=order), rank)
        for name, kind in itertools.product(DISPATCHERS, ROUTINGS):
            dispatcher = build_dispatcher(name, local * ep, topology)
            results[(name, etp, ep, local, order, kind)] = run_case(dispatcher, topology, kind, rank)
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(WORLD, sweep)


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


def test_uneven_collectives_and_their_backward(ranks):
    for rank, result in enumerate(ranks):
        for name, (got, expected) in result["collectives"].items():
            close(got, expected, f"rank {rank} {name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_combine_undoes_dispatch_and_tokens_get_their_gradient(ranks, case):
    """Experts that return token x prob: the output is the token times its summed probs (the token itself in
    the dropless case, kept / top_k of it when dropping), and so is the gradient."""
    name, etp, ep, local, order, kind = case
    for rank, result in enumerate(r[case] for r in ranks):
        _, probs = routing(kind, rank, local * ep, ep)
        share = probs.sum(1, keepdim=True)
        if kind == "dropless":
            assert torch.allclose(share, torch.ones_like(share))
        close(result["output"], result["tokens"] * share, f"rank {rank} output")
        close(result["grad_tokens"], result["grad_out"] * share, f"rank {rank} token gradient")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_rank_receives_exactly_the_pairs_of_its_experts(ranks, case):
    """tokens_per_expert and the (token id, expert, prob) of every dispatched row, against all ranks' maps:
    a rank gets every pair of the ETP x EP group whose expert it holds, sorted by local expert."""
    name, etp, ep, local, order, kind = case
    num_experts = local * ep
    for result in (r[case] for r in ranks):
        mine = range(result["first_expert"], result["first_expert"] + local)
        expected = []
        for source in result["group"]:
            routing_map, probs = routing(kind, source, num_experts, ep)
            pairs = routing_map.nonzero().tolist()
            expected += [(source * TOKENS + t, e, float(probs[t, e])) for t, e in pairs if e in mine]
        assert result["received"] == sorted(expected)
        assert result["tokens_per_expert"] == [sum(e == expert for _, e, _ in expected) for expert in mine]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_reaches_the_probs(ranks, case):
    """d/d prob[t, e] of sum(output * g) is token_t . g_t on every routed pair (fillers included), 0 elsewhere."""
    name, etp, ep, local, order, kind = case
    for rank, result in enumerate(r[case] for r in ranks):
        routing_map, _ = routing(kind, rank, local * ep, ep)
        expected = routing_map * (result["tokens"] * result["grad_out"]).sum(1, keepdim=True)
        close(result["grad_probs"], expected, f"rank {rank} probs gradient")
        assert routing_map.any() == result["grad_probs"].abs().sum().bool()  # non-zero wherever anything is routed


@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == "empty"], ids=case_id)
def test_a_rank_routing_nothing_and_idle_experts(ranks, case):
    """Rank 0 routes no token: zero output and gradients. The last EP rank's experts get no token."""
    name, etp, ep, local, order, kind = case
    results = [r[case] for r in ranks]
    assert not results[0]["output"].any() and not results[0]["grad_tokens"].any()
    for result in results:
        if result["first_expert"] == (ep - 1) * local:
            assert result["tokens_per_expert"] == [0] * local and result["received"] == []


def test_build_dispatcher_refuses_bad_arguments():
    topology = Topology.build(Sizes(world=8, ep=4), 0, create_groups=False)
    with pytest.raises(ValueError, match="alltoall, allgather"):
        build_dispatcher("deepep", 8, topology)
    with pytest.raises(ValueError, match="not divisible by the expert-parallel size 4"):
        build_dispatcher("alltoall", 6, topology)
