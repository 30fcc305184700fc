"""`python -m launch --dry-run CONFIG.yaml [section.key=value ...] --world-size N`: check a layout before launching.

Validates the config against the world size (no rank starts, no data is read) and prints
the rank map of both parallel views, the parameters each rank holds and an estimate of
its memory (`--json PATH`: the memory estimate per rank as JSON, for tools). An impossible
layout ends with one line naming the fields and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pretrain.cli import USER_ERRORS, ArgumentParser, UsageError, config_and_overrides, parse_command, print_error

USAGE = ("usage: python -m launch --dry-run CONFIG.yaml [section.key=value ...] "
         "(--world-size N | --nnodes A --nproc-per-node B) [--json PATH]")

# precision.dtype=bf16 autocasts the matrix multiplies; the weights stay fp32 (see PrecisionConfig).
WEIGHT_BYTES = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m launch", add_help=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--nnodes", type=int)
    parser.add_argument("--nproc-per-node", type=int)
    parser.add_argument("--json")
    parser.add_argument("args", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if not args.dry_run:
        raise UsageError("only --dry-run is available here; train with launch/torchrun.sh or launch/slurm.sbatch")
    by_world = args.world_size is not None
    by_nodes = args.nnodes is not None and args.nproc_per_node is not None
    if by_world == by_nodes or (args.nnodes is None) != (args.nproc_per_node is None):
        raise UsageError("give either --world-size N or both --nnodes and --nproc-per-node")
    if by_nodes:
        args.world_size = args.nnodes * args.nproc_per_node
    if min(n for n in (args.world_size, args.nnodes, args.nproc_per_node) if n is not None) < 1:
        raise UsageError("--world-size, --nnodes and --nproc-per-node must be positive")
    args.path, args.overrides = config_and_overrides(args.args)
    return args


def dry_run(path: str, overrides: list[str], world_size: int, *, memory: list | None = None) -> str:
    """The report for a valid layout; ConfigError or TopologyError for an impossible one. `memory`, if given,
    receives the estimate of each (stage, tp rank) as a dict of bytes (what --json writes)."""
    import torch

    from launch.estimate import (
        activation_terms, chunk_recomputation, human_bytes, kv_cache_bytes, parameters_per_tp_rank,
        peak_activation_bytes, state_bytes,
    )
    from parallel.pipeline import PipelineSchedule, bubble_fraction, describe_chunks, pipeline_chunks
    from parallel.topology import Topology, TopologyError, describe
    from pretrain.model import GPT
    from pretrain.config import ConfigError
    from pretrain.config_loading import load_config
    from pretrain.model import padded_vocab_size
    from pretrain.trainer import load_tokenizer

    cfg = load_config(path, overrides).validate(world_size)
    m, p, sizes = cfg.model, cfg.parallel, cfg.sizes(world_size)
    m = dataclasses.replace(m, norm_impl="torch")  # models that are only counted: apex's norms have torch's parameters
    vocab_size = m.vocab_size or padded_vocab_size(load_tokenizer(cfg).vocab_size, m.vocab_multiple)
    virtual = p.virtual_pipeline or 1
    chunks = pipeline_chunks(m.num_layers, p.pipeline, virtual, first=p.first_stage_layers, last=p.last_stage_layers)
    try:
        counts = parameters_per_tp_rank(m, vocab_size, sizes, chunks=chunks)
    except TopologyError as err:  # a weight that does not split evenly, such as the vocabulary over TP
        raise ConfigError(f"the model does not split over parallel.tensor={p.tensor}: {err}") from None
    with torch.device("meta"):
        total = GPT(m, vocab_size, Topology.single()).num_parameters()

    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * sizes.dp)
    lines = [f"{path}: valid for {world_size} ranks", "", describe(sizes), ""]
    schedule = PipelineSchedule(p.pipeline, micro, virtual)
    if p.pipeline > 1:
        lines += ["pipeline: " + describe_chunks(chunks)]
        if virtual > 1:
            lines.append(f"interleaved 1F1B, {virtual} chunks per stage, {micro} micro-batches per step: "
                         f"bubble fraction (p-1)/(v*m+p-1) = {bubble_fraction(p.pipeline, micro, virtual):.1%}")
        else:
            lines.append(f"1F1B with {micro} micro-batches per step: bubble fraction (p-1)/(m+p-1) = "
                         f"{bubble_fraction(p.pipeline, micro):.1%}")
        lines.append("")
    lines.append(f"parameters: {total:,} in the model (vocabulary {vocab_size}); per rank, by pipeline stage and "
                 "tensor-parallel coordinate:")
    for c in counts:
        experts = f" + {c.expert:,} expert" if c.expert else ""
        lines.append(f"  {_where(c, p.pipeline)}: {c.total:,} ({c.split:,} tensor-parallel{experts} + {c.replicated:,} "
                     "replicated)")

    sharded = cfg.optimizer.distributed
    shards = sizes.dp * sizes.cp if sharded else 1
    element_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    rlp = cfg.objective.rlp if cfg.objective.name == "rlp" else None
    # RLP's forward with gradients runs every thought of a micro-batch's contexts: G x positions rows per sample
    rows = cfg.train.micro_batch_size * (rlp.group_size * rlp.positions_per_sequence if rlp else 1)

    def activations(stage: int) -> tuple[float, float]:
        """(activations, the autocast weight copies among them) of this stage: each chunk's terms, with the layers
        it recomputes, walked through the stage's order of forwards and backwards (1F1B keeps p - s micro-batches
        alive); the embedding and output terms are counted in every chunk (an overestimate)."""
        shapes = dict(tp=p.tensor, cp=p.context, sequence_parallel=p.sequence_parallel and p.tensor > 1,
                      element_bytes=element_bytes, residual_bytes=WEIGHT_BYTES, ep=sizes.ep, etp=sizes.expert_tp)
        terms = [activation_terms(chunk_model, rows, vocab_size, **shapes)
                 for chunk_model in chunk_recomputation(m, [len(r) for r in chunks[stage]])]
        order = [(action.chunk, action.backward) for action in schedule.orders[stage]]
        copies = [{"kept": t["kept_copies"], "forward": t["weight_copies"] - t["kept_copies"], "backward": 0.0}
                  for t in terms]
        return peak_activation_bytes(terms, order), peak_activation_bytes(copies, order)

    lines += [
        "", "memory per rank, an estimate (see launch/estimate.py; buffers and fragmentation not included):",
        f"  fp{WEIGHT_BYTES * 8} weights, fp32 gradients, fp32 Adam states "
        + (f"sharded over DP x CP = {shards} ranks"
           + (f" (experts: over EDP = {sizes.edp})" if m.moe.num_experts else "")
           if sharded else "not sharded (optimizer.distributed off)"),
        f"  {cfg.precision.dtype} activations of one micro-batch of {rows} x {m.seq_length} "
        + (f"tokens (RLP: {cfg.train.micro_batch_size} samples x {rlp.positions_per_sequence} positions x "
           f"{rlp.group_size} thoughts)" if rlp else "tokens")
        + f", recomputation {m.recompute}"
        + (f" of {m.recompute_layers} layer(s) per stage" if m.recompute == "full" and m.recompute_layers else "")
        + (" (times the micro-batch chunks in flight on a stage)" if p.pipeline > 1 else "")
        + (", with the bf16 weight copies autocast keeps" if element_bytes < WEIGHT_BYTES else ""),
    ]
    if rlp:
        lines.append(f"  RLP: an fp32 EMA teacher (as the weights) and the key-value cache of sampling, {rows} rows "
                     f"of up to {m.seq_length} tokens (freed before the forward with gradients, yet added to the "
                     "total: an over-estimate)")
    if cfg.precision.fp8.enabled:  # the FP8 layers keep two e4m3 copies of a weight (2 bytes, as bf16's one)
        lines.append("  FP8 counted as bf16: an over-estimate, as its linear layers save their inputs in one byte "
                     "(tensorwise, delayed)")
    for c in counts:
        dense = state_bytes(c.total - c.expert, WEIGHT_BYTES, shards)
        experts = state_bytes(c.expert, WEIGHT_BYTES, sizes.edp if sharded else 1)
        acts, copies = activations(c.stage)
        parts = {**{k: dense[k] + experts[k] for k in dense}, "activations": acts}
        if rlp:
            parts["teacher"] = 4 * c.total
            parts["kv_cache"] = kv_cache_bytes(m, rows, tp=p.tensor, element_bytes=element_bytes,
                                               layers=max(len(r) for r in chunks[c.stage]))
        if memory is not None:
            memory.append({"stage": c.stage, "tp_rank": c.tp_rank, "parameters": c.total, **parts,
                           "total": sum(parts.values()), "autocast_weight_copies": copies})
        terms = " + ".join(f"{name} {human_bytes(size)}" for name, size in parts.items())
        of_which = f" (of which weight copies {human_bytes(copies)})" if copies else ""
        lines.append(f"  {_where(c, p.pipeline)}: {terms}{of_which} = {human_bytes(sum(parts.values()))}")
    return "\n".join(lines)


def _where(c, stages: int) -> str:
    return f"stage {c.stage} tp rank {c.tp_rank}" if stages > 1 else f"tp rank {c.tp_rank}"


def main(argv: list[str]) -> int:
    args = parse_command(argv, parse_args, program="launch", usage=USAGE)
    if isinstance(args, int):
        return args
    memory: list = []
    try:
        print(dry_run(args.path, args.overrides, args.world_size, memory=memory))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": args.world_size, "memory_per_rank": memory}, f, indent=1)
    except USER_ERRORS as err:
        print_error("launch", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
