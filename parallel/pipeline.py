"""Pipeline parallelism: which layers live where, the order each stage runs its micro-batches in, and the
point-to-point messages between stages.

The decoder layers are cut into `stages x chunks` consecutive pieces, the virtual stages. Virtual stage
`c * stages + s` is chunk c of stage s, so with several chunks per stage (interleaving) a micro-batch
goes round the ring of stages `chunks` times: the last stage hands chunk c's output to the first
stage's chunk c + 1. With one chunk this is the plain pipeline.

Each stage runs its forwards (F) and backwards (B) in a fixed order: `warmup` forwards, then one
forward and one backward alternately, then the remaining backwards (1F1B). Its forwards go through
the chunks in groups of `stages` micro-batches (chunk 0 of micro-batches 0..p-1, chunk 1 of the same,
...), the backwards through the chunks in reverse. The warm-up of stage s, `p - s - 1 + (v - 1) p`
forwards, is the least that keeps every stage busy: the bubble is (p - 1) / (v m + p - 1), interleaving
divides it by about v, and a stage keeps at most warmup + 1 micro-batch chunks alive. (Megatron-LM warms
up p - s - 1 more, to overlap its sends with compute; it has the same bubble and more memory.) With one
stage it is a plain gradient-accumulation loop.

Messages: `PipelineSchedule` plays the orders of all stages on a common clock of ticks, one action per
stage per tick, an action running as soon as its input has arrived. Every stage then knows, for each of
its ticks, which tensors it sends and receives; they are exchanged in one batched send/receive per tick.
Because both ends of a message exchange it at the same tick, every send meets its receive and no
ordering of sends can deadlock, for any order of actions that is itself valid.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from parallel.placement import restage
from parallel.topology import TopologyError


def pipeline_chunks(num_layers: int, stages: int, chunks: int = 1, *, first: Optional[int] = None,
                    last: Optional[int] = None) -> list[list[range]]:
    """`result[s][c]`: the global layer numbers of chunk c of stage s. `first`/`last`: layers of the first
    and last virtual stage (the one with the embedding, the one with the output layer), the others
    split evenly; both null: an even split. Raises TopologyError naming the fields."""
    pieces = stages * chunks
    what = f"parallel.pipeline={stages}" if chunks == 1 else \
        f"parallel.pipeline x parallel.virtual_pipeline = {stages} x {chunks} = {pieces} chunks"
    if first is None and last is None:
        if num_layers % pieces:
            raise TopologyError(f"model.num_layers={num_layers} is not divisible by {what}: choose a multiple, "
                             "or set parallel.first_stage_layers/last_stage_layers")
        sizes = [num_layers // pieces] * pieces
    else:
        middle_layers = num_layers - (first or 0) - (last or 0)
        middle = pieces - (first is not None) - (last is not None)
        if middle_layers < 0 or (middle == 0 and middle_layers) or (middle and middle_layers % middle):
            raise TopologyError(
                f"model.num_layers={num_layers} with parallel.first_stage_layers={first} and last_stage_layers="
                f"{last} leaves {middle_layers} layers for {middle} middle piece(s) of {what}: they must split evenly"
            )
        per = middle_layers // middle if middle else 0
        sizes = ([first] if first is not None else []) + [per] * middle + ([last] if last is not None else [])
    if min(sizes) < 1:
        raise TopologyError(f"a pipeline chunk would hold no layer (layers per virtual stage {sizes}) with {what}: "
                         "give every chunk one")
    starts = [sum(sizes[:v]) for v in range(pieces)]
    ranges = [range(a, a + n) for a, n in zip(starts, sizes)]
    return [[ranges[c * stages + s] for c in range(chunks)] for s in range(stages)]


@dataclass(frozen=True)
class Stage:
    """What one pipeline stage builds: the global numbers of the decoder layers of each of its chunks, and
    whether it holds the model's input end (the embedding, on the first chunk of the first stage) and its
    output end (the final norm and the output layer, on the last chunk of the last stage). With tied
    embeddings and more than one stage, the last stage holds its own copy of the embedding table
    (`tied_copies`), kept equal by summing both copies' gradients over the embedding group."""

    chunks: tuple[range, ...]
    _: KW_ONLY
    first: bool = True
    last: bool = True
    tie_embeddings: bool = False

    @classmethod
    def of(cls, topology, chunks: list[list[range]], *, tie_embeddings: bool) -> "Stage":
        """This rank's stage of the split `chunks` (from `pipeline_chunks`)."""
        return cls(tuple(chunks[topology.pp_rank]), first=topology.is_first_stage, last=topology.is_last_stage,
                   tie_embeddings=tie_embeddings)

    @classmethod
    def whole(cls, num_layers: int, *, tie_embeddings: bool = False) -> "Stage":
        """The whole model on one stage."""
        return cls((range(num_layers),), tie_embeddings=tie_embeddings)

    @property
    def holds_embedding(self) -> bool:
        return self.first or (self.last and self.tie_embeddings)

    @property
    def tied_copies(self) -> bool:
        return self.tie_embeddings and not (self.first and self.last)

    def starts_model(self, chunk: int) -> bool:
        return self.first and chunk == 0

    def ends_model(self, chunk: int) -> bool:
        return self.last and chunk == len(self.chunks) - 1

    def assign(self, parameters_of_chunk: Iterable[Iterable[torch.nn.Parameter]],
               embedding: Optional[torch.nn.Parameter]) -> None:
        """Record in every parameter's placement the chunk whose backward pass produces its gradient (gradient
        buckets never span chunks: each chunk finishes its backward passes on its own), and mark the copies of
        a tied embedding table."""
        for chunk, parameters in enumerate(parameters_of_chunk):
            for param in parameters:
                restage(param, chunk=chunk, tied=self.tied_copies and param is embedding)


def describe_chunks(chunks: list[list[range]]) -> str:
    """'stage 0: layers 0-1 + 4-5, stage 1: layers 2-3 + 6-7': which layers each stage holds, chunk by chunk."""
    def span(r: range) -> str:
        return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)
    return ", ".join(f"stage {s}: layers " + " + ".join(span(r) for r in stage) for s, stage in enumerate(chunks))


def bubble_fraction(stages: int, micro_batches: int, chunks: int = 1) -> float:
    """The idle share of a (interleaved) 1F1B step: (p - 1) / (v m + p - 1)."""
    return (stages - 1) / (chunks * micro_batches + stages - 1)


@dataclass(frozen=True)
class Action:
    backward: bool
    micro_batch: int
    chunk: int


def stage_order(stages: int, stage: int, micro_batches: int, *, chunks: int = 1, train: bool = True) -> list[Action]:
    """The order in which `stage` runs its forwards and backwards (see the module docstring).
    Interleaving needs micro_batches to be a multiple of stages (checked by the config)."""
    total = micro_batches * chunks

    def action(k: int, backward: bool) -> Action:
        group, within = divmod(k, stages * chunks) if chunks > 1 else (0, k)
        chunk, offset = divmod(within, stages) if chunks > 1 else (0, k)
        return Action(backward, group * stages + offset, chunks - 1 - chunk if backward else chunk)

    if not train:
        return [action(k, False) for k in range(total)]
    warmup = min(total, stages - stage - 1 + (chunks - 1) * stages)
    order = [action(k, False) for k in range(warmup)]
    for k in range(total - warmup):
        order += [action(warmup + k, False), action(k, True)]
    return order + [action(k, True) for k in range(total - warmup, total)]


@dataclass
class Tick:
    """One stage's share of a tick: the action it runs (if any), then the messages it sends and receives,
    each as (peer stage, the action on the receiving stage that consumes it)."""
    clock: int
    action: Optional[Action] = None
    sends: list = field(default_factory=list)
    receives: list = field(default_factory=list)


class PipelineSchedule:
    """The actions and messages of every stage, tick by tick, for one step (or one evaluation pass)."""

    def __init__(self, stages: int, micro_batches: int, chunks: int = 1, *, train: bool = True):
        self.stages, self.chunks, self.micro_batches = stages, chunks, micro_batches
        self.orders = [stage_order(stages, s, micro_batches, chunks=chunks, train=train) for s in range(stages)]
        self.ticks = self._play()

    def most_in_flight(self, stage: int) -> int:
        """The most micro-batch chunks whose activations `stage` keeps alive at once under this order (a
        forward's activations live until its backward)."""
        alive = most = 0
        for action in self.orders[stage]:
            alive += -1 if action.backward else 1
            most = max(most, alive)
        return most

    def consumer(self, stage: int, action: Action) -> Optional[tuple[int, Action]]:
        """Where the result of `action` goes: a forward's output to the next virtual stage's forward,
        a backward's input gradient to the previous virtual stage's backward; None at the ends."""
        virtual = action.chunk * self.stages + stage + (-1 if action.backward else 1)
        if not 0 <= virtual < self.stages * self.chunks:
            return None
        return virtual % self.stages, Action(action.backward, action.micro_batch, virtual // self.stages)

    def needs_input(self, stage: int, action: Action) -> bool:
        virtual = action.chunk * self.stages + stage
        return virtual != (self.stages * self.chunks - 1 if action.backward else 0)

    def _play(self) -> list[list[Tick]]:
        arrived: dict[tuple[int, Action], int] = {}  # (stage, consuming action) -> tick its input was sent
        position = [0] * self.stages
        ticks: list[list[Tick]] = [[] for _ in range(self.stages)]
        clock = 0
        while any(position[s] < len(self.orders[s]) for s in range(self.stages)):
            now = [Tick(clock) for _ in range(self.stages)]
            for s, order in enumerate(self.orders):
                if position[s] == len(order):
                    continue
                action = order[position[s]]
                if self.needs_input(s, action) and arrived.get((s, action), clock) >= clock:
                    continue  # its input is not there yet
                position[s] += 1
                now[s].action = action
                target = self.consumer(s, action)
                if target is not None:
                    now[s].sends.append(target)
                    now[target[0]].receives.append((s, target[1]))
            if not any(t.action for t in now):
                raise RuntimeError(f"the pipeline orders deadlock at tick {clock}: {position}")  # a bug in stage_order
            for s, tick in enumerate(now):
                for peer, action in tick.sends:
                    arrived[(peer, action)] = clock
                if tick.action or tick.receives:
                    ticks[s].append(tick)
            clock += 1
        self.length = clock
        return ticks


class StageLink:
    """Batched point-to-point exchanges with other stages of this rank's pipeline group.

    Creating one is collective over the pipeline group: every stage exchanges a one-element tensor with its
    neighbours on the ring of stages (the previous and the next, the last stage's next being the first),
    so the group's first batched send/receive involves all of its ranks. torch requires that of a
    `batch_isend_irecv` that is the first call on its group (with NCCL it creates the group's communicator;
    a subset of the ranks would leave the behaviour undefined), and a schedule's first tick has only two
    stages talking. With NCCL the communicator also exists already where the process group was bound to a
    device (`pretrain.distributed.setup`); this exchange makes the rule hold either way, and sets up the
    neighbours' connections before the first step is timed (torch.distributed.pipelining does the same)."""

    def __init__(self, topology, shape: tuple, *, dtype: torch.dtype, device: torch.device):
        self.ranks, self.stage = topology.members["pp"], topology.pp_rank
        self.group = topology.groups["pp"]
        self.shape, self.dtype, self.device = shape, dtype, device
        if len(self.ranks) > 1:
            self._connect()

    def _connect(self) -> None:
        stages = len(self.ranks)
        neighbours = sorted({(self.stage + 1) % stages, (self.stage - 1) % stages})  # one stage with two stages
        ops = [dist.P2POp(dist.isend, torch.zeros(1, device=self.device), self.ranks[s], group=self.group)
               for s in neighbours]
        ops += [dist.P2POp(dist.irecv, torch.empty(1, device=self.device), self.ranks[s], group=self.group)
                for s in neighbours]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    def exchange(self, sends: list[tuple[torch.Tensor, int]], sources: list[int]) -> list[torch.Tensor]:
        """Send each (tensor, stage) and receive one tensor from each stage in `sources`, all at once."""
        received = [torch.empty(self.shape, dtype=self.dtype, device=self.device) for _ in sources]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.ranks[s], group=self.group) for t, s in sends]
        ops += [dist.P2POp(dist.irecv, r, self.ranks[s], group=self.group) for r, s in zip(received, sources)]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received


def run_schedule(
    schedule: PipelineSchedule,
    link: StageLink,
    forward: Callable[[int, int, Optional[torch.Tensor]], torch.Tensor],
    *,
    before_backward: Callable[[int, int], None] = lambda micro_batch, chunk: None,
) -> list[torch.Tensor]:
    """Run this stage's part of the schedule. forward(micro_batch, chunk, input) runs one chunk (input: the
    previous virtual stage's output, None on the first) and returns its output, or on the last virtual
    stage the loss (in training, already divided by the number of micro-batches). before_backward(
    micro_batch, chunk) is called before each backward pass.

    Returns the last virtual stage's outputs in micro-batch order (empty on other stages)."""
    inbox: dict[Action, torch.Tensor] = {}
    alive: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
    losses = {}
    for tick in schedule.ticks[link.stage]:
        result = None
        action = tick.action
        if action is not None and not action.backward:
            received = inbox.pop(action, None)
            if received is not None and torch.is_grad_enabled():
                received.requires_grad_(True)
            result = forward(action.micro_batch, action.chunk, received)
            if schedule.consumer(link.stage, action) is None:
                losses[action.micro_batch] = result
            if result.requires_grad:
                alive[(action.micro_batch, action.chunk)] = (received, result)
        elif action is not None:
            received, output = alive.pop((action.micro_batch, action.chunk))
            before_backward(action.micro_batch, action.chunk)
            torch.autograd.backward(output, grad_tensors=inbox.pop(action, None))
            result = None if received is None else received.grad
        sends = [(result.detach(), peer) for peer, _ in tick.sends]
        for (_, consumer), tensor in zip(tick.receives, link.exchange(sends, [peer for peer, _ in tick.receives])):
            inbox[consumer] = tensor
    return [losses[i] for i in sorted(losses)]


def gather_over_stages(local: dict, topology) -> dict:
    """Per-layer values of this stage (keyed by global layer number) merged with the other stages', in layer
    order; every rank of the pipeline group must call it."""
    stages = [local]
    if topology.pp > 1:
        stages = [None] * topology.pp
        dist.all_gather_object(stages, local, group=topology.groups["pp"])
    merged = {k: v for stage in stages for k, v in stage.items()}
    return {k: merged[k] for k in sorted(merged, key=int)}
