"""Back-of-the-envelope sizes for `python -m launch --dry-run`: parameters and memory per rank.

Parameters are counted exactly, by building one rank's model on the meta device (shapes
only, no memory). Memory is an estimate: weights, gradients and optimizer states follow
Megatron-LM's accounting; activations count the tensors each layer of pretrain/model/gpt.py
keeps for its backward pass. Allocator fragmentation, communication buffers, the CUDA
context and temporary tensors are not included, so leave headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.pipeline import Stage
from parallel.placement import placement_of
from parallel.topology import Sizes, Topology, group_tables
from pretrain.config import ModelConfig
from pretrain.model import GPT


@dataclass(frozen=True)
class RankParameters:
    """The parameters one rank holds; every rank with these pipeline and tensor-parallel coordinates holds the same."""

    stage: int
    tp_rank: int
    split: int  # elements of this rank's slices of the tensor-parallel weights
    replicated: int  # elements every tensor-parallel rank holds in full (norms, GPAS gates, routers)
    expert: int = 0  # elements of this rank's experts (E / EP of them, split over ETP)

    @property
    def total(self) -> int:
        return self.split + self.replicated + self.expert


def count_parameters(model: torch.nn.Module) -> tuple[int, int, int]:
    """(split, replicated, expert) elements of a model, by each parameter's placement."""
    split = replicated = expert = 0
    for param in model.parameters():
        placement = placement_of(param)
        if placement.expert:
            expert += param.numel()
        elif not placement.split_over_tensor_group:
            replicated += param.numel()
        else:
            split += param.numel()
    return split, replicated, expert


def parameters_per_tp_rank(model_cfg: ModelConfig, vocab_size: int, sizes: Sizes, *,
                           chunks: list[list[range]] | None = None) -> list[RankParameters]:
    """Build the model of one rank per (pipeline stage, tensor-parallel coordinate) on the meta device and count
    its parameters. `chunks`: the layers of each stage's chunks (default: all on one stage).

    The layers size themselves from the topology, so this counts what each rank will really allocate.
    """
    chunks = chunks or [[range(model_cfg.num_layers)]]
    counts = []
    for ranks in group_tables(sizes)["tp"]:
        topology = Topology.build(sizes, ranks[0], create_groups=False)
        if topology.dp_rank or topology.cp_rank:
            continue  # the same as the tp group of DP x CP rank 0 of this stage
        for tp_rank, rank in enumerate(ranks):
            topology = Topology.build(sizes, rank, create_groups=False)
            with torch.device("meta"):
                model = GPT(model_cfg, vocab_size, topology,
                            stage=Stage.of(topology, chunks, tie_embeddings=model_cfg.tie_embeddings))
            counts.append(RankParameters(topology.pp_rank, tp_rank, *count_parameters(model)))
    return sorted(counts, key=lambda c: (c.stage, c.tp_rank))


def state_bytes(params: int, weight_bytes: int, optimizer_shards: int = 1) -> dict[str, float]:
    """Bytes of weights, gradients and Adam states for `params` parameters on one rank.

    As in Megatron-LM: gradients are kept in fp32; Adam's m and v are fp32, plus an fp32 master
    copy of the weights when the weights themselves are 16-bit; the distributed optimizer shards
    the optimizer states over `optimizer_shards` ranks (the data-parallel x context-parallel group).
    """
    optimizer = 4 * 2 + (4 if weight_bytes < 4 else 0)
    return {
        "weights": float(weight_bytes * params),
        "gradients": float(4 * params),
        "optimizer": optimizer * params / optimizer_shards,
    }


def activation_bytes(
    m: ModelConfig, micro_batch: int, vocab_size: int, *, tp: int = 1, cp: int = 1,
    sequence_parallel: bool = False, element_bytes: int = 2,
) -> float:
    """Bytes of the activations one micro-batch keeps for the backward pass on one rank.

    The method of Korthikanti et al. 2022 (Megatron's s*b*h*(34 + 5*a*s/h) per layer), applied to this
    model: no dropout, grouped-query attention, SwiGLU or GELU, and flash attention, which keeps no
    s x s score matrix. Each rank holds s = seq_length / CP tokens of b sequences. Per layer without
    recomputation (`model.recompute: none`), in elements:

    replicated over TP (split over TP with sequence parallelism, counting as Megatron-LM does that a
    column-parallel linear keeps its sequence shard and gathers it again for the backward pass):
        4*s*b*h      inputs of the two norms and of the column-parallel linears after them
    split over TP:
        s*b*h        queries
        2*S*b*g*d    keys and values of g query groups (S = seq_length: context parallelism gathers them)
        s*b*h        attention output, the input of the output projection
        4*s*b*f      SwiGLU: gate, up, silu(gate) and their product (GELU: 2*s*b*f, its input and output)

    `selective` keeps the layer's input (s*b*h, replicated as above) and the outputs of its matrix
    multiplies and of attention, and recomputes the rest:
        s*b*(h + 2*g*d) / TP   the query/key/value projection (local keys and values: the gathered ones
                               are recomputed)
        s*b*h / TP             attention output
        2*s*b*h                the two row-parallel outputs, before their reduction over TP
        2*s*b*f / TP           SwiGLU's gate and up projections (GELU: s*b*f)

    `full` keeps only the input of each recomputed layer (the first `recompute_layers` of the stage, or
    all), and while one of them is recomputed in backward its whole activations exist once more.

    After the last layer: the final norm's input and output (2*s*b*h, like the first row) and one
    chunk of logits (min(model.loss_chunk_tokens, s*b) * vocab, split over TP): the output layer and the
    loss run fused, chunk by chunk, and keep no logits for backward. Everything at `element_bytes`
    (2 for bf16, 4 for fp32).
    """
    s, b, S = m.seq_length // cp, micro_batch, m.seq_length
    h, f, g = m.hidden_size, m.ffn_size, m.query_groups
    d = h // m.num_attention_heads
    replicated_divisor = tp if sequence_parallel else 1
    swiglu = m.activation == "swiglu"
    layer_input = s * b * h / replicated_divisor
    mlp = (4 if swiglu else 2) * s * b * f
    layer = 4 * layer_input + (s * b * h + 2 * S * b * g * d + s * b * h + mlp) / tp
    if m.recompute == "selective":
        layer = layer_input + (s * b * (h + 2 * g * d) + s * b * h + (2 if swiglu else 1) * s * b * f) / tp \
            + 2 * s * b * h
    output = 2 * s * b * h / replicated_divisor + min(m.loss_chunk_tokens or s * b, s * b) * vocab_size / tp
    layers = m.num_layers * layer
    if m.recompute == "full":
        recomputed = min(m.recompute_layers or m.num_layers, m.num_layers)
        layers = recomputed * layer_input + (m.num_layers - recomputed) * layer + layer  # + one being recomputed
    return float(element_bytes * (layers + output))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"
