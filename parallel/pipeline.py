"""Pipeline parallelism: which layers live on which stage, the point-to-point link, and the 1F1B schedule.

Stage s holds a contiguous block of decoder layers (the first and last stages may be given
fewer, to balance the embedding and the output layer). Micro-batches flow forward through
the stages and their gradients flow back. The 1F1B schedule runs, on stage s of p, p-s-1
warm-up forwards, then alternates one forward and one backward, then drains the remaining
backwards: a stage never holds the activations of more than p micro-batches. With one stage
it is a plain gradient-accumulation loop (forward, backward, next micro-batch).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist


def stage_layers(num_layers: int, stages: int, first: Optional[int] = None, last: Optional[int] = None) -> list[range]:
    """The global layer numbers of each stage. `first`/`last`: layers on the first/last stage (the rest
    split evenly over the middle stages); both null: an even split. Raises ValueError naming the fields."""
    if stages == 1:
        return [range(num_layers)]
    if first is None and last is None:
        if num_layers % stages:
            raise ValueError(f"model.num_layers={num_layers} is not divisible by parallel.pipeline={stages}: "
                             "choose a multiple, or set parallel.first_stage_layers/last_stage_layers")
        per = num_layers // stages
        return [range(s * per, (s + 1) * per) for s in range(stages)]
    middle_layers = num_layers - (first or 0) - (last or 0)
    middle = stages - (first is not None) - (last is not None)
    if middle_layers < 0 or (middle == 0 and middle_layers) or (middle and middle_layers % middle):
        raise ValueError(
            f"model.num_layers={num_layers} with parallel.first_stage_layers={first} and last_stage_layers={last} "
            f"leaves {middle_layers} layers for {middle} middle stage(s): they must split evenly"
        )
    per = middle_layers // middle if middle else 0
    sizes = ([first] if first is not None else []) + [per] * middle + ([last] if last is not None else [])
    if min(sizes) < 1:
        raise ValueError(f"a pipeline stage would hold no layer (layers per stage {sizes}): give every stage one")
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle share of a 1F1B step: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


class StageLink:
    """Sends activations to the next stage and gradients to the previous one over the pipeline group."""

    def __init__(self, topology, shape: tuple, dtype: torch.dtype, device: torch.device):
        ranks = topology.members["pp"]
        s = self.stage = topology.pp_rank
        self.stages = len(ranks)
        self.group = topology.groups["pp"]
        self.prev = ranks[s - 1] if s > 0 else None
        self.next = ranks[s + 1] if s < len(ranks) - 1 else None
        self.shape, self.dtype, self.device = shape, dtype, device

    def _exchange(self, send: list[tuple[torch.Tensor, int]], recv_from: Optional[int]) -> Optional[torch.Tensor]:
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group=self.group) for t, peer in send]
        received = None
        if recv_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received, recv_from, group=self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received

    def recv_forward(self) -> Optional[torch.Tensor]:
        return self._exchange([], self.prev)

    def send_forward(self, output: Optional[torch.Tensor]) -> None:
        self._exchange([(output, self.next)] if self.next is not None else [], None)

    def recv_backward(self) -> Optional[torch.Tensor]:
        return self._exchange([], self.next)

    def send_backward(self, grad: Optional[torch.Tensor]) -> None:
        self._exchange([(grad, self.prev)] if self.prev is not None else [], None)

    def send_forward_recv_backward(self, output: torch.Tensor) -> Optional[torch.Tensor]:
        return self._exchange([(output, self.next)] if self.next is not None else [], self.next)

    def send_backward_recv_forward(self, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return self._exchange([(grad, self.prev)] if self.prev is not None else [], self.prev)


def one_f_one_b(
    forward: Callable[[int, Optional[torch.Tensor]], torch.Tensor],
    before_backward: Callable[[int], None],
    micro_batches: int,
    link: StageLink,
) -> int:
    """Run the 1F1B schedule; returns the most micro-batches whose activations were alive at once.

    forward(i, input) runs micro-batch i on this stage (input: the previous stage's output, None on
    the first stage) and returns its output, or on the last stage its loss (already divided by the
    number of micro-batches). before_backward(i) is called before micro-batch i's backward pass.
    """
    warmup = min(link.stages - link.stage - 1, micro_batches)
    in_flight: list[tuple[int, Optional[torch.Tensor], torch.Tensor]] = []
    most = 0

    def run_forward(i: int, received: Optional[torch.Tensor]) -> torch.Tensor:
        nonlocal most
        if received is not None:
            received.requires_grad_(True)
        output = forward(i, received)
        in_flight.append((i, received, output))
        most = max(most, len(in_flight))
        return output

    def run_backward(grad_output: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        i, received, output = in_flight.pop(0)
        before_backward(i)
        torch.autograd.backward(output, grad_tensors=grad_output)
        return None if received is None else received.grad

    for i in range(warmup):
        link.send_forward(run_forward(i, link.recv_forward()))
    received = link.recv_forward() if warmup < micro_batches else None
    for i in range(warmup, micro_batches):
        output = run_forward(i, received)
        grad_output = link.send_forward_recv_backward(output) if link.next is not None else None
        grad_input = run_backward(grad_output)
        if i == micro_batches - 1:
            link.send_backward(grad_input)
        else:
            received = link.send_backward_recv_forward(grad_input)
    for _ in range(warmup):
        link.send_backward(run_backward(link.recv_backward()))
    return most


def forward_only(forward: Callable[[int, Optional[torch.Tensor]], torch.Tensor], micro_batches: int,
                 link: StageLink) -> list[torch.Tensor]:
    """Every micro-batch through this stage without gradients (evaluation); returns the last stage's outputs."""
    outputs = []
    for i in range(micro_batches):
        output = forward(i, link.recv_forward())
        link.send_forward(output)
        outputs.append(output)
    return outputs
