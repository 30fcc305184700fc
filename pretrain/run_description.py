"""What a run says about itself before its first step (`describe`): the lines a user reads to check that the
run is the one they meant, each choice made for them named (`auto` kernels, resharding, fresh FP8 state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from parallel.pipeline import describe_chunks
from pretrain import distributed
from pretrain.model import fp8 as fp8_model

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


def describe(trainer: Trainer) -> str:
    """What the run is, printed once at its start: the model, data, batch, layout and kernels, and every choice
    made for the user (a resumed or resharded checkpoint, fresh FP8 histories, a slow bf16 CPU)."""
    m, t = trainer.cfg.model, trainer.cfg.train
    lines = [
        f"model: {trainer.model.num_parameters():,} parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads / {m.query_groups} query groups"
        + (f" of {m.head_size}" if m.head_size * m.num_attention_heads != m.hidden_size else "")
        + (", q/k norms" if m.qk_norm else "") + f", vocab {trainer.vocab_size})",
        f"data: {len(trainer.plan.sources)} source(s) in {len(trainer.plan.schedule.phase_names)} phase(s), "
        f"{len(trainer.data.validation)} validation set(s); samples of {m.seq_length + 1} tokens\n"
        + indent(trainer.plan.report()),
        f"batch: {t.global_batch_size} sequences = {trainer.tokens_per_step:,} tokens per step, "
        f"{trainer.loader.micro_batches_per_step} micro-batches of {t.micro_batch_size}; device {trainer.device}; "
        f"precision {fp8_model.describe(trainer.fp8, trainer.cfg.precision.dtype)}",
        f"layout: {trainer.topology.world_size} rank(s), TP{trainer.topology.tp} x CP{trainer.topology.cp} x "
        f"DP{trainer.topology.dp} x PP{trainer.topology.pp}"
        + (" with sequence parallelism" if trainer.topology.sequence_parallel else "")
        + (", distributed optimizer" if trainer.cfg.optimizer.distributed else "")
        + (f"; experts ETP{trainer.topology.sizes.expert_tp} x EP{trainer.topology.sizes.ep} x "
           f"EDP{trainer.topology.sizes.edp}" if m.moe.num_experts else ""),
        describe_kernels(trainer),
    ]
    if trainer.device.type == "cpu" and trainer.cfg.precision.dtype == "bf16" and distributed.cpu_lacks_native_bf16():
        lines.append("precision: this CPU lacks AVX-512, which oneDNN's bf16 matrix multiply needs: bf16 runs "
                     "far slower than fp32 here (precision.dtype=fp32 for speed on this machine)")
    if trainer.topology.pp > 1:
        lines.append("pipeline: " + describe_chunks(trainer.chunks))
    if not trainer.data.validation and trainer.cfg.eval.interval:
        lines.append(f"validation: none (data.split={trainer.cfg.data.split!r} leaves no documents for it)")
    if trainer.resume_from:
        lines.append(f"resumed from {trainer.resume_from} at step {trainer.step}")
    if trainer.resharded_from is not None:
        now = trainer.layout()
        lines.append("  saved in another layout (" + ", ".join(
            f"{k} {trainer.resharded_from.get(k)!r} -> {now.get(k)!r}" for k in sorted({*now, *trainer.resharded_from})
            if trainer.resharded_from.get(k) != now.get(k))
            + "): resharded on load; the random states are reseeded from (seed, step, rank)")
    if trainer.init_from:
        lines.append(f"initialised from {trainer.init_from} (its weights; a fresh optimizer, schedule and data)")
    if trainer.rlp is not None:
        r = trainer.cfg.objective.rlp
        lines.append(f"objective: RLP, {r.group_size} thoughts of up to {r.max_thought_tokens} tokens per context, "
                     f"{r.positions_per_sequence} context(s) per sample; EMA teacher (tau {r.tau}) "
                     + ("from the weights at the start" if trainer.teacher_afresh else "resumed"))
    if trainer.fp8_afresh:
        lines.append(f"FP8: the checkpoint holds no {trainer.fp8_state()} state; the amax histories start afresh")
    if trainer.step >= t.iters:
        lines.append(
            f"train.iters={t.iters} is already reached: nothing to train "
            "(raise train.iters to continue, or use a new run.dir to start over)"
        )
    return "\n".join(lines)


def describe_kernels(trainer: Trainer) -> str:
    """Which implementation computes the norms and the optimizer step, and why `auto` kept torch if it did."""
    if trainer.cfg.optimizer.impl == "apex":
        optimizer = "apex FusedAdam"
    else:
        fused = trainer.optimizer.param_groups[0].get("fused")
        optimizer = "torch AdamW" + (" (fused)" if fused else " (not fused)")
    return (f"kernels: norm {trainer.cfg.model.norm_impl}, optimizer {optimizer}"
            + (f"; auto kept torch: {'; '.join(trainer.kept_torch)}" if trainer.kept_torch else ""))


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())
