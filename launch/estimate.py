"""Back-of-the-envelope sizes for `python -m launch --dry-run`: parameters and memory per rank.

Parameters are counted exactly, by building one rank's model on the meta device (shapes
only, no memory). Memory is an estimate: weights, gradients and optimizer states follow
Megatron-LM's accounting; activations count the tensors each layer of pretrain/model/gpt.py
keeps for its backward pass. Allocator fragmentation, communication buffers, the CUDA
context and temporary tensors are not included, so leave headroom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


def _moe_layers(m: ModelConfig) -> int:
    return sum(m.moe.is_moe_layer(i) for i in range(m.num_layers)) if m.moe.num_experts else 0


def routed_pairs(m: ModelConfig, tokens: float, *, etp: int = 1) -> float:
    """(token, expert) pairs one rank's experts compute, of `tokens` tokens entering each MoE block of a rank:
    top_k per token (dropless; on average over EP: each rank receives as many pairs as it sends), at most each
    expert's capacity with a capacity factor (exactly it with pad_to_capacity), times ETP (the ETP peers compute
    on the same, gathered, pairs)."""
    moe = m.moe
    pairs = moe.top_k * tokens
    if moe.capacity_factor is not None:
        capacity = min(tokens, math.ceil(tokens * moe.top_k / moe.num_experts * moe.capacity_factor))
        pairs = moe.num_experts * capacity if moe.pad_to_capacity else min(pairs, moe.num_experts * capacity)
    return pairs * etp


def activation_bytes(
    m: ModelConfig, micro_batch: int, vocab_size: int, *, tp: int = 1, cp: int = 1,
    sequence_parallel: bool = False, element_bytes: int = 2, residual_bytes: int = 4, ep: int = 1, etp: int = 1,
    in_flight: int = 1,
) -> float:
    """Bytes of activation memory on one rank at its peak, with `in_flight` micro-batches held for the backward
    pass (1F1B: p - stage): kept * in_flight + max(forward, backward) of `activation_terms`.

    Counted tensor by tensor from what autograd saves in pretrain/model/gpt.py (as measured on the CPU by
    tools/activation_memory.py, which tests/test_memory_estimate.py compares with this), in the manner of
    Korthikanti et al. 2022 (Megatron's s*b*h*(34 + 5*a*s/h) per layer) but with two dtypes: the matrix
    multiplies' outputs and inputs are `element_bytes` (e: 2 under bf16 autocast), while the residual stream
    and the norms are `residual_bytes` (r: 4; the weights are fp32, autocast runs the norms in fp32, so residual
    adds and norm inputs stay fp32). Under fp32, e = r = 4. No dropout, grouped-query attention, flash
    attention (no s x s scores). A rank holds T = s*b tokens, s = seq_length / CP, of b sequences; q = TP under
    sequence parallelism (SP), else 1. Per layer without recomputation (`model.recompute: none`), in bytes:

    norms (replicated over TP; split over TP under SP, where they see a sequence shard), each:
        r*T*h/q       its input (the residual stream)
        r*T*h/q       torch's RMSNorm also keeps x * rsqrt(mean(x^2)) (LayerNorm: only small mean and rstd)
    inputs of the column-parallel linears (replicated over TP, and under SP too: the linear keeps the input it
    was given, the gathered full sequence; Megatron-LM frees it and gathers again in backward, foldtron not):
        e*T*h         the query/key/value projection's
        e*T*h         the MLP's, twice for SwiGLU under autocast (gate and up each cast the fp32 input to bf16)
                      and under SP (the gathered input is not contiguous: each linear reshapes it to a copy)
    split over TP:
        e*T*(h+2gd)   the query/key/value projection's output, kept whole (values are a view of it), g groups
                      of head size d
        e*T*(h+gd)    the queries and keys after rotary embedding
        e*T*h         attention output, the input of the output projection (plus its log-sum-exp, 4*T*a)
        2*e*S*b*g*d   under CP only: the keys and values gathered over the whole sequence S = seq_length
        4*e*T*f       SwiGLU: gate, up, silu(gate) and their product (GELU: 2*e*T*f, its input and output)

    An MoE layer (`model.moe`) replaces the MLP's linear inputs and activations with those of its N routed
    pairs (`routed_pairs`: top_k*T/q, capped by the capacity, times ETP) of experts of width F / ETP:
        r*T*h/q           the router's input (the fp32 norm output; routing runs in fp32)
        e*N*h             the permuted tokens in bf16, the experts' input
        5*e*N*F/ETP       SwiGLU: gate, up, silu(gate), their product and the product times the probability
                          (GELU: 3*e*N*F/ETP)
        e*N*h             the experts' outputs, which the combine keeps
        32*N + 4*T*(2E + 3k)/q   the dispatcher's indices (int64) and the router's scores
    plus the shared expert, if any, counted as a dense MLP of its width.

    `selective` keeps the layer's input (r*T*h/q) and the outputs of its matrix multiplies and of attention,
    and recomputes the rest:
        e*T*(h + 2gd)/TP   the query/key/value projection
        e*T*h/TP           attention output
        2*e*T*h            the two row-parallel outputs, before their reduction over TP
        2*e*T*f/TP         SwiGLU's gate and up projections (GELU: e*T*f)
        (MoE: e*N*(2F/ETP + h), the experts' matmuls, instead of the last two rows' MLP terms)

    `full` keeps only the input of each recomputed layer (the first `recompute_layers` of the stage, or
    all); the others are kept as without recomputation.

    bf16 copies of the weights (under autocast only, e < r): autocast casts each decoder-layer matmul weight
    once per forward (its cache lives for the autocast region, one micro-batch of Trainer.stage_forward) and
    the matmul keeps the copy: e bytes per matmul weight element (`layer_matmul_weights`). A layer without
    recomputation keeps its copies with its activations; a recomputed one keeps none after its forward.

    After the last layer: the final norm's kept tensors (as a norm above), its output r*T*h (gathered: the loss
    keeps the hidden states), 16 bytes a token for the labels and the loss's statistics, the rotary tables
    8*T*d, and one chunk of logits: min(model.loss_chunk_tokens, T) * vocab / TP elements, fp32 (4 bytes) plus
    the matmul's e-byte output alongside when e < 4, and under autocast the loss's e-byte copy of the output
    weight, e*vocab/TP*h: the output layer and the loss run fused, chunk by chunk, and keep no logits for
    backward, but one chunk is alive at a time in the forward and backward passes.

    kept = the layers' terms above + the output terms but the logits chunk; on top of it, at the worst moment,
        forward  = the logits chunk + the weight copies of the recomputed layers (all exist during the forward)
        backward = one recomputed layer (the largest): its terms without recomputation less what it kept,
                   plus its weight copies and its output r*T*h/q (alive until the recomputation returns;
                   in an MoE layer under autocast also the fp32 permuted tokens r*N*h), while it is
                   recomputed, less the output terms (freed by then; 0 without recomputation).
    """
    t = activation_terms(m, micro_batch, vocab_size, tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                         element_bytes=element_bytes, residual_bytes=residual_bytes, ep=ep, etp=etp)
    return peak_activation_bytes([t], [(0, False)] * in_flight)


def peak_activation_bytes(chunk_terms: list[dict[str, float]], order) -> float:
    """The peak of a stage whose chunks have `activation_terms` `chunk_terms`, run in `order`, (chunk, backward)
    pairs (a pipeline stage's order of forwards and backwards): the most bytes the forwards kept alive at once,
    plus the worst transient of any chunk (an upper bound: it may come at another moment)."""
    alive = most = 0.0
    for chunk, backward in order:
        alive += (-1 if backward else 1) * chunk_terms[chunk]["kept"]
        most = max(most, alive)
    return most + max(max(t["forward"], t["backward"]) for t in chunk_terms)


def chunk_recomputation(m: ModelConfig, chunk_layers: list[int]) -> list[ModelConfig]:
    """The model section of each chunk of a stage (`chunk_layers`: the layers of each), sized to the chunk, with the
    recomputation it does: `full` with `recompute_layers` recomputes the first that many layers of the stage, so
    chunk 0's first, as pretrain/model/gpt.py does."""
    left = m.recompute_layers or sum(chunk_layers)
    models = []
    for layers in chunk_layers:
        if m.recompute != "full":
            models.append(replace(m, num_layers=layers))
            continue
        recomputed, left = min(layers, left), left - min(layers, left)
        models.append(replace(m, num_layers=layers, recompute="full" if recomputed else "none",
                              recompute_layers=recomputed or None))
    return models


def activation_terms(
    m: ModelConfig, micro_batch: int, vocab_size: int, *, tp: int = 1, cp: int = 1,
    sequence_parallel: bool = False, element_bytes: int = 2, residual_bytes: int = 4, ep: int = 1, etp: int = 1,
) -> dict[str, float]:
    """The terms of `activation_bytes` (see there): bytes `kept` by one micro-batch after its forward, the
    `forward` and `backward` transients on top of them, and `weight_copies`, the autocast copies among them
    (`kept_copies`, those of the layers not recomputed, plus those of the recomputed layers), for the report."""
    s, b, S = m.seq_length // cp, micro_batch, m.seq_length
    h, f, g, a = m.hidden_size, m.ffn_size, m.query_groups, m.num_attention_heads
    d = m.head_size
    e, r = element_bytes, residual_bytes
    T = s * b
    q = tp if sequence_parallel else 1
    swiglu = m.activation == "swiglu"
    autocast = e < r
    norm = (2 if m.norm == "rmsnorm" else 1) * r * T * h / q + 4 * T / q  # + its rstd
    layer_input = r * T * h / q
    heads = a * d  # the width of the queries and of attention's output (hidden_size unless model.head_dim differs)
    attention = e * T * h + (e * T * (heads + 2 * g * d) + e * T * (heads + g * d) + e * T * heads + 4 * T * a) / tp
    if m.qk_norm:  # the q/k norms (fp32) keep their inputs and outputs, and their rstd
        attention += (8 * T * (heads + g * d) + 4 * T * (a + g)) / tp
    if cp > 1:
        attention += 2 * e * S * b * g * d / tp
    attention_selective = layer_input + (e * T * (heads + 2 * g * d) + e * T * heads + 4 * T * a) / tp + 2 * e * T * h

    def mlp(width: int) -> float:
        inputs = (2 if swiglu and (autocast or q > 1) else 1) * e * T * h  # a copy per linear: see the docstring
        return inputs + (4 if swiglu else 2) * e * T * width / tp

    mlp_selective = lambda width: (2 if swiglu else 1) * e * T * width / tp  # noqa: E731
    copies = [e * w if autocast else 0.0 for w in layer_matmul_weights(m, tp=tp, ep=ep, etp=etp)]
    kinds = []  # (layers, without recomputation, selective, weight copies, recomputation's extra) by kind
    moe_layers = _moe_layers(m)
    if moe_layers < m.num_layers:
        kinds.append((m.num_layers - moe_layers, 2 * norm + attention + mlp(f),
                      attention_selective + mlp_selective(f), copies[0], layer_input))
    if moe_layers:
        E, k, F_ = m.moe.num_experts, m.moe.top_k, m.moe.ffn_hidden_size or f
        shared = m.moe.shared_expert_ffn_hidden_size or 0
        N = routed_pairs(m, T / q, etp=etp)
        experts = r * T * h / q + e * N * h + (5 if swiglu else 3) * e * N * F_ / etp + e * N * h \
            + 32 * N + 4 * T * (2 * E + 3 * k) / q
        kinds.append((moe_layers, 2 * norm + attention + experts + (mlp(shared) if shared else 0),
                      attention_selective + e * N * (2 * F_ / etp + h) + 4 * T * E / q
                      + (mlp_selective(shared) if shared else 0), copies[1],
                      layer_input + (r * N * h if autocast else 0)))
    recomputed = {"none": 0, "selective": m.num_layers,
                  "full": min(m.recompute_layers or m.num_layers, m.num_layers)}[m.recompute]
    share = recomputed / m.num_layers  # of each kind of layer (an average: the first layers are the recomputed)
    kept_by = {"none": lambda plain, selective: plain, "selective": lambda plain, selective: selective,
               "full": lambda plain, selective: layer_input}[m.recompute]
    kept = sum(n * ((1 - share) * (plain + copy) + share * kept_by(plain, selective))
               for n, plain, selective, copy, _ in kinds)
    chunk = min(m.loss_chunk_tokens or T, T)
    output = norm + r * T * h + 16 * T + 8 * T * d  # the output terms but the logits
    kept += output
    logits = chunk * vocab_size / tp * (4 + (e if e < 4 else 0)) + (e * vocab_size / tp * h if autocast else 0)
    recomputed_copies = sum(n * share * copy for n, _, _, copy, _ in kinds)
    backward = max(plain - kept_by(plain, selective) + copy + extra for _, plain, selective, copy, extra in kinds) \
        - output \
        if recomputed else 0.0  # the output terms are freed before the last layer's backward
    kept_copies = sum(n * (1 - share) * copy for n, _, _, copy, _ in kinds)
    return {"kept": float(kept), "forward": float(logits + recomputed_copies), "backward": float(backward),
            "weight_copies": float(kept_copies + recomputed_copies), "kept_copies": float(kept_copies)}


def layer_matmul_weights(m: ModelConfig, *, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[float, float]:
    """Elements of one rank's matmul weights in (a dense layer, an MoE layer): what autocast casts to bf16."""
    h, f, g, d, a = m.hidden_size, m.ffn_size, m.query_groups, m.head_size, m.num_attention_heads
    per_mlp = 3 if m.activation == "swiglu" else 2
    attention = (h * (a * d + 2 * g * d) + h * a * d) / tp
    moe = 0.0
    if m.moe.num_experts:
        moe = attention + m.moe.num_experts / ep * per_mlp * h * (m.moe.ffn_hidden_size or f) / etp \
            + per_mlp * h * (m.moe.shared_expert_ffn_hidden_size or 0) / tp
    return attention + per_mlp * h * f / tp, moe


def kv_cache_bytes(m: ModelConfig, rows: int, *, tp: int, element_bytes: int, layers: int) -> float:
    """The key-value cache of generation (pretrain/model/kv_cache.py): keys and values of this rank's query groups,
    for `rows` sequences of up to seq_length tokens, in every layer of the stage."""
    return 2.0 * layers * rows * (m.query_groups // tp) * m.head_size * m.seq_length * element_bytes


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"
