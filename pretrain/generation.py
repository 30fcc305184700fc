"""Batched sampling through the key-value cache: prompts in, new tokens out, on one rank or under TP (with SP)
and EP.

The prompts are left-padded into one batch (pretrain/model/kv_cache.py) and prefilled once; each step then
feeds every row its last token. The last position's logits are all-gathered over TP ([rows, vocab], small)
and every TP rank samples from the same values with the same generator; rank 0's tokens are broadcast all
the same, so that the ranks of a group can never disagree about what comes next. Under sequence parallelism
the rows are padded to a multiple of TP with copies of the last prompt (their tokens are dropped).

A row stops at one of its stop ids (the stop id is kept in its tokens) or after `max_new_tokens`. Under
expert parallelism an MoE layer's all-to-all needs every rank of its group in every forward, and the ranks
of a data-parallel group stop at different steps, so the ranks decide together whether to go on (one
one-element all-reduce per step; none on one rank).

Pipeline and context parallelism are refused: a pipeline would need its stages to pass every token of the
decode loop along, and under CP a rank holds chunks of a sequence, not the newest token.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from parallel.collectives import gather_along
from parallel.errors import FoldtronError
from pretrain import distributed
from pretrain.model.kv_cache import KVCache


class GenerationError(FoldtronError, ValueError):
    """Generation asked of a layout or with settings it cannot run."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature 0 is greedy (argmax); else softmax(logits / temperature),
    restricted to the smallest set of most likely tokens whose probability reaches `top_p`.
    `vocab_limit`: ids at or above it are never drawn (the padding of the model's vocabulary)."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    vocab_limit: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens}: generate at least one token")
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p={self.top_p}: must be in (0, 1]")


@dataclass
class Generation:
    """What `generate` made: each row's new tokens (a stop id, when it stopped on one, is the last), whether it
    stopped on a stop id (else it ran to max_new_tokens), the steps and wall time (prefill included)."""
    tokens: list[list[int]]
    stopped: list[bool]
    steps: int = 0
    seconds: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)  # with keep_logits: each step's [rows, vocab], fp32

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def check_layout(topology) -> None:
    if topology.pp > 1 or topology.cp > 1:
        raise GenerationError(f"generation runs with parallel.pipeline=1 and parallel.context=1 (this layout has "
                              f"pipeline={topology.pp}, context={topology.cp}); load the checkpoint into a layout "
                              "without them")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token [rows] from full-vocabulary logits [rows, vocab] (any dtype; computed in fp32)."""
    logits = logits.float()
    if sampling.vocab_limit is not None and sampling.vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[:, sampling.vocab_limit:] = -torch.inf
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling, *, generator: torch.Generator | None = None,
             pad_id: int = 0, share_prefill: int = 1, keep_logits: bool = False,
             autocast=contextlib.nullcontext) -> Generation:
    """Sample continuations of `prompts` (lists of token ids) through `model` (a GPT, pretrain/model/gpt.py).

    `share_prefill` = G: each prompt is sampled G times; it is prefilled once and its cache copied to its G
    rows (the rows come out prompt by prompt: p0 x G, p1 x G, ...). `generator`: the random stream of
    sampling (on the model's device), the same on the ranks of a TP group. `autocast`: the context that the
    training forward runs in (bf16). `keep_logits`: also return each step's gathered logits (tests)."""
    sampling.check()
    topology = model.topology
    check_layout(topology)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    device = next(model.parameters()).device
    started = time.perf_counter()
    rows = len(prompts) * share_prefill
    multiple = topology.tp if topology.sequence_parallel else 1
    padded_prompts = prompts + [prompts[-1]] * (-len(prompts) % multiple)  # so that rows x new splits over TP
    longest = max(len(p) for p in padded_prompts)
    ids = torch.full((len(padded_prompts), longest), pad_id, dtype=torch.long)
    for r, p in enumerate(padded_prompts):
        ids[r, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([longest - len(p) for p in padded_prompts], device=device)
    cache = KVCache(start=start, capacity=longest + sampling.max_new_tokens)
    out = Generation(tokens=[], stopped=[])
    stops = torch.tensor(sampling.stop_ids, dtype=torch.long, device=device)
    with _evaluating(model), autocast():
        logits = model.decode(ids.to(device), cache)
        if share_prefill > 1:  # each prompt's cache to its G rows, padded again to a multiple of TP
            index = torch.arange(len(prompts), device=device).repeat_interleave(share_prefill)
            index = torch.cat([index, index[-1:].expand(-rows % multiple)])
            cache, logits = cache.select(index), logits[index]
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        drawn = torch.empty(rows, sampling.max_new_tokens, dtype=torch.long, device=device)
        lengths = torch.full((rows,), sampling.max_new_tokens, dtype=torch.long, device=device)
        for step in range(sampling.max_new_tokens):
            full = gather_along(logits, -1, topology.tp_group).float()  # [rows, vocab]
            if keep_logits:
                out.logits.append(full[:rows].clone())
            token = sample(full[:rows], sampling, generator)  # the padding rows draw nothing: the same stream
            if topology.tp > 1:
                torch.distributed.broadcast(token, src=topology.members["tp"][0], group=topology.tp_group)
            drawn[:, step] = token
            hit = torch.isin(token, stops) & ~done
            lengths = torch.where(hit, step + 1, lengths)
            done |= hit
            out.steps = step + 1
            # the step's one host sync: whether any row on any rank goes on
            more = step + 1 < sampling.max_new_tokens and not bool(done.all())
            if not distributed.any_rank(more, device=device)[0]:
                break
            token = torch.cat([token, token[-1:].expand(cache.rows - rows)])
            logits = model.decode(token[:, None], cache)
    drawn, lengths, done = drawn[:, :out.steps].tolist(), lengths.tolist(), done.tolist()
    out.tokens = [row[:n] for row, n in zip(drawn, lengths)]
    out.stopped = done
    out.seconds = time.perf_counter() - started
    return out

