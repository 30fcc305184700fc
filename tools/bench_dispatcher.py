"""Communication volume and time of the MoE token dispatchers: `python -m tools.bench_dispatcher`.

Starts 8 gloo ranks on the CPU (forked processes) and, for the layouts EP8 x ETP1 and EP4 x ETP2 and
both dispatchers, runs dispatch + combine (the forward; backward moves the same volume through the
adjoint collectives) on T tokens of width H per rank, routed top-k over E experts so that every expert
gets exactly T·k/E of every rank's tokens: balanced routing, for which the formulas below are exact.
The collective calls are wrapped to count the bytes each rank sends to other ranks; they are printed
step by step next to the analytic volume, with the time per dispatch + combine (the slowest rank's
mean; 8 processes share the machine's cores, so times compare the dispatchers, nothing more).

Bytes one rank sends, with b = 4 (fp32 tokens and probs), N = ETP·EP (the "tp-ep" group) and P = T·k
the rank's (token, expert) pairs. An all-gather or reduce-scatter of S bytes per rank sends (n-1)·S per
rank (a ring over n ranks); the uneven ones pad every part to the largest, which balanced routing
makes equal. An all-to-all sends what goes to the other ranks.

  alltoall   counts [E] int64       all-gather over tp-ep      (N-1)·E·8
             tokens                 all-to-all over ep         P·(EP-1)/EP·H·b   (pairs whose expert is elsewhere)
             probs                  all-to-all over ep         P·(EP-1)/EP·4
             tokens                 all-gather-v over etp      (ETP-1)·P·H·b   (P pairs on a rank after the all-to-all)
             probs                  all-gather-v over etp      (ETP-1)·P·4
             outputs                reduce-scatter-v over etp  (ETP-1)·P·H·b
             outputs                all-to-all over ep         P·(EP-1)/EP·H·b
  allgather  token count int64      all-gather over tp-ep      (N-1)·8
             tokens                 all-gather-v over tp-ep    (N-1)·T·H·b
             probs [T, E]           all-gather-v over tp-ep    (N-1)·T·E·4
             routing map uint8      all-gather-v over tp-ep    (N-1)·T·E
             outputs                reduce-scatter-v tp-ep     (N-1)·T·H·b

So alltoall moves about 2·P·H·b·((EP-1)/EP + ETP-1) and allgather 2·(N-1)·T·H·b: with k < N the
all-to-all wins, by (N-1)/(k·(EP-1)/EP) when ETP = 1.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

import parallel.collectives as coll
from parallel.expert_parallel import build_dispatcher
from parallel.topology import Sizes, Topology

WORLD = 8
LAYOUTS = [(8, 1), (4, 2)]  # (EP, ETP)


def analytic(kind: str, *, ep: int, etp: int, a) -> list[tuple[str, str, str, int]]:
    """(collective, group, payload, bytes a rank sends) of each step of a forward dispatch + combine, in order."""
    n, pairs, b = ep * etp, a.tokens * a.top_k, 4
    if kind == "allgather":
        steps = [("all_gather", "tp-ep", "token count", (n - 1) * 8),
                 ("all_gather", "tp-ep", "tokens", (n - 1) * a.tokens * a.hidden * b),
                 ("all_gather", "tp-ep", "probs", (n - 1) * a.tokens * a.experts * 4),
                 ("all_gather", "tp-ep", "routing map", (n - 1) * a.tokens * a.experts),
                 ("reduce_scatter", "tp-ep", "outputs", (n - 1) * a.tokens * a.hidden * b)]
        return steps if n > 1 else []
    away = pairs * (ep - 1) // ep
    steps = [("all_gather", "tp-ep", "counts", (n - 1) * a.experts * 8)] if n > 1 else []
    if ep > 1:
        steps += [("all_to_all", "ep", "tokens", away * a.hidden * b), ("all_to_all", "ep", "probs", away * 4)]
    if etp > 1:
        steps += [("all_gather", "etp", "tokens", (etp - 1) * pairs * a.hidden * b),
                  ("all_gather", "etp", "probs", (etp - 1) * pairs * 4),
                  ("reduce_scatter", "etp", "outputs", (etp - 1) * pairs * a.hidden * b)]
    if ep > 1:
        steps += [("all_to_all", "ep", "outputs", away * a.hidden * b)]
    return steps


def balanced_routing(rank: int, a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [T, H], probs [T, E] and routing map [T, E]: token t takes experts (v·k + j) mod E, j < k, for
    v a random permutation of the tokens, so that each expert gets exactly T·k/E of them."""
    g = torch.Generator().manual_seed(rank)
    v = torch.randperm(a.tokens, generator=g)
    experts = (v[:, None] * a.top_k + torch.arange(a.top_k)) % a.experts
    routing_map = torch.zeros(a.tokens, a.experts, dtype=torch.bool).scatter_(1, experts, True)
    weights = torch.rand(a.tokens, a.experts, generator=g) * routing_map
    probs = weights / weights.sum(1, keepdim=True)
    return torch.randn(a.tokens, a.hidden, generator=g), probs, routing_map


class Counter:
    """Wraps the collective calls and records (collective, group size, bytes this rank sends) of each."""

    def __init__(self):
        self.calls = []
        self.originals = dist.all_to_all_single, coll._all_gather_single, coll._reduce_scatter_single

    def __enter__(self):
        all_to_all, all_gather, reduce_scatter = self.originals

        def counted_all_to_all(out, x, output_splits, input_splits, group=None, **kwargs):
            row = x[0].numel() * x.element_size() if len(x) else 0
            sent = sum(input_splits) - input_splits[dist.get_rank(group)]
            self.calls.append(("all_to_all", dist.get_world_size(group), sent * row))
            return all_to_all(out, x, output_splits, input_splits, group=group, **kwargs)

        def counted_all_gather(out, x, group=None, **kwargs):
            n = dist.get_world_size(group)
            self.calls.append(("all_gather", n, (n - 1) * x.numel() * x.element_size()))
            return all_gather(out, x, group=group, **kwargs)

        def counted_reduce_scatter(out, x, group=None, **kwargs):
            n = dist.get_world_size(group)
            self.calls.append(("reduce_scatter", n, (n - 1) * out.numel() * out.element_size()))
            return reduce_scatter(out, x, group=group, **kwargs)

        dist.all_to_all_single = counted_all_to_all
        coll._all_gather_single, coll._reduce_scatter_single = counted_all_gather, counted_reduce_scatter
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single, coll._all_gather_single, coll._reduce_scatter_single = self.originals


def forward(dispatcher, tokens, *, probs, routing_map, etp: int) -> torch.Tensor:
    """Dispatch, experts that return token x prob (a row-parallel partial under ETP), combine."""
    expert_tokens, _, expert_probs = dispatcher.dispatch(tokens, probs, routing_map)
    return dispatcher.combine(expert_tokens * expert_probs[:, None] / etp)


def measure(rank: int, kind: str, *, topology: Topology, a) -> dict:
    """This rank's collective calls in one forward, the round-trip error and the mean seconds per forward."""
    etp = topology.sizes.expert_tp
    dispatcher = build_dispatcher(kind, a.experts, topology)
    tokens, probs, routing_map = balanced_routing(rank, a)
    with Counter() as counter:
        output = forward(dispatcher, tokens, probs=probs, routing_map=routing_map, etp=etp)
    error = (output - tokens).abs().max().item()  # the probs of a token sum to 1: combine gives the token back
    for _ in range(2):
        forward(dispatcher, tokens, probs=probs, routing_map=routing_map, etp=etp)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(a.iters):
        forward(dispatcher, tokens, probs=probs, routing_map=routing_map, etp=etp)
    return {"calls": counter.calls, "error": error, "seconds": (time.perf_counter() - start) / a.iters}


def report(kind: str, *, ep: int, etp: int, a, results: list[dict]) -> tuple[int, int, float]:
    """Print one dispatcher's steps (rank 0's bytes; every rank's are checked equal); return the totals."""
    expected = analytic(kind, ep=ep, etp=etp, a=a)
    calls = results[0]["calls"]
    sizes = {"ep": ep, "etp": etp, "tp-ep": ep * etp}
    seconds = max(r["seconds"] for r in results)
    error = max(r["error"] for r in results)
    print(f"\n{kind} | EP{ep} x ETP{etp} | {seconds * 1e3:.2f} ms per dispatch + combine | "
          f"round-trip error {error:.1e}")
    print(f"  {'step':>4}  {'collective':<15}{'group':<7}{'payload':<13}{'measured B':>12}{'analytic B':>12}")
    for step, ((op, n, sent), (want_op, group, payload, want)) in enumerate(zip(calls, expected), 1):
        mark = "" if (op, n, sent) == (want_op, sizes[group], want) else "  <- differs"
        print(f"  {step:>4}  {op:<15}{group:<7}{payload:<13}{sent:>12,}{want:>12,}{mark}")
    measured, total = sum(c[2] for c in calls), sum(s[3] for s in expected)
    print(f"  {'':>4}  {'total':<35}{measured:>12,}{total:>12,}")
    if len(calls) != len(expected):
        print(f"  !! {len(calls)} collectives measured, {len(expected)} expected")
    if any(r["calls"] != calls for r in results):
        print("  !! the ranks moved different volumes")
    return measured, total, seconds


def rank_main(rank: int, port: int, a) -> None:
    torch.set_num_threads(1)  # 8 ranks share the cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        summary = []
        for ep, etp in LAYOUTS:
            topology = Topology.build(Sizes(world=WORLD, ep=ep, etp=etp), rank)
            for kind in ("alltoall", "allgather"):
                result = measure(rank, kind, topology=topology, a=a)
                results = [None] * WORLD
                dist.all_gather_object(results, result)
                if rank == 0:
                    summary.append((f"EP{ep} x ETP{etp}", kind, *report(kind, ep=ep, etp=etp, a=a, results=results)))
        if rank == 0:
            print(f"\nsummary: bytes each rank sends per forward dispatch + combine "
                  f"(T={a.tokens} H={a.hidden} E={a.experts} top-{a.top_k}, fp32)")
            print(f"  {'layout':<13}{'dispatcher':<12}{'measured B':>13}{'analytic B':>13}{'ms':>9}")
            for layout, kind, measured, total, seconds in summary:
                print(f"  {layout:<13}{kind:<12}{measured:>13,}{total:>13,}{seconds * 1e3:>9.2f}")
            sys.stdout.flush()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_dispatcher", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank (T)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (H)")
    parser.add_argument("--experts", type=int, default=8, help="experts (E), a multiple of 8")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per dispatcher")
    a = parser.parse_args(argv)
    if a.experts % WORLD or (a.tokens * a.top_k) % a.experts or not 0 < a.top_k <= a.experts:
        parser.error("need experts a multiple of 8, top-k <= experts, and experts dividing tokens x top-k")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # the ranks start with torch already imported
    procs = [ctx.Process(target=rank_main, args=(rank, port, a)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [rank for rank, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        print(f"bench_dispatcher: error: rank(s) {failed} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
