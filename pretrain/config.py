"""Experiment configuration: typed sections and their validation (loading: `pretrain/config_loading.py`).

Every field has a default, so a YAML file only lists what it changes. Loading checks
names and types; `Config.validate` checks values and their consistency. Both raise
`ConfigError` with one line per problem, each naming the field and the fix, before
any rank allocates a tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import yaml

from data.blend import PhaseConfig, ScheduleError, SourceConfig, phase_boundaries
from pretrain.config_checks import Problems
from pretrain.config_fp8 import config_problems as fp8_problems
from pretrain.config_moe import MoEConfig
from pretrain.config_moe import config_problems as moe_problems
from pretrain.config_rlp import RLPConfig
from pretrain.config_rlp import config_problems as rlp_problems
from parallel.errors import FoldtronError
from parallel.pipeline import pipeline_chunks
from parallel.topology import Sizes, TopologyError


class ConfigError(FoldtronError, ValueError):
    """A bad config: the message names each offending field and how to fix it."""


def ceil_to(x: int, m: int) -> int:
    """The smallest multiple of `m` that is at least `x` (integers only, no float rounding)."""
    return -(-x // m) * m


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = "quickstart"  # names the run folder when run.dir is not given
    dir: Optional[str] = None  # the run folder (resolved config, metrics, TensorBoard, checkpoints); null: runs/<name>
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    debug: bool = False  # show tracebacks instead of one-line errors

    def __post_init__(self):
        if self.dir is None:
            self.dir = os.path.join("runs", self.name)


@dataclass
class GPASConfig:
    enabled: bool = False
    gate_grad_clip: Optional[float] = None  # separate gradient-norm clip for the gates (the paper: 0.01)


@dataclass
class RopeScalingConfig:
    """Rotary frequencies rescaled for a longer context than pretraining's. `type: llama3` is Llama-3.1's (the
    frequencies of wavelengths above original_max_position_embeddings / low_freq_factor divided by `factor`, those
    below original / high_freq_factor kept, a smooth blend between); null: none."""
    type: Optional[Literal["llama3"]] = None
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # null: one per head (multi-head attention)
    head_dim: Optional[int] = None  # width of each attention head; null: hidden_size / num_attention_heads
    qk_norm: bool = False  # RMSNorm over head_dim of each query and key head before the rotary embedding (Qwen3)
    ffn_hidden_size: Optional[int] = None  # null: 4*hidden (gelu), 8/3*hidden rounded up to 64 (swiglu)
    seq_length: int = 256
    vocab_size: Optional[int] = None  # null: the tokenizer's vocabulary, padded to vocab_multiple
    vocab_multiple: int = 128
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    # auto: NVIDIA apex's fused norm where it can run (CUDA, apex with its extensions, on every rank), else torch
    norm_impl: Literal["auto", "torch", "apex"] = "auto"
    activation: Literal["swiglu", "gelu"] = "swiglu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # the context the model is meant for: written to an exported Hugging Face config.json (max_position_embeddings);
    # no effect on training; null: seq_length
    max_position_embeddings: Optional[int] = None
    tie_embeddings: bool = False
    # tokens per chunk of the output layer fused with the loss (peak memory ~ chunk x vocab / TP); null: one chunk
    loss_chunk_tokens: Optional[int] = 8192
    init_std: float = 0.02
    scaled_init: bool = True  # output projections of each layer use init_std / sqrt(2 * num_layers)
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation (pretrain/model/recompute.py)
    recompute_layers: Optional[int] = None  # with full: recompute the first this many layers of each stage; null: all
    gpas: GPASConfig = field(default_factory=GPASConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """The width of each attention head (`head_dim`, or hidden_size / num_attention_heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "gelu":
            return 4 * self.hidden_size
        return ceil_to(8 * self.hidden_size // 3, 64)


@dataclass
class ParallelConfig:
    tensor: int = 1
    context: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    first_stage_layers: Optional[int] = None  # layers of the first / last stage (with interleaving: of its
    # first / last chunk, the one holding the embedding / the output layer); null: an even split
    last_stage_layers: Optional[int] = None
    expert: int = 1
    expert_tensor: Optional[int] = None  # null: same as tensor
    sequence_parallel: bool = False  # no effect with tensor=1, as in Megatron-LM
    order: str = "tp-cp-ep-dp-pp"  # fastest-varying axis first, as in Megatron-LM
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on the CPU
    timeout_minutes: float = 10.0  # a collective that waits longer fails, naming the rank
    grad_bucket_mb: float = 25.0  # gradients are reduced in buckets of this size while backward runs


@dataclass
class Fp8Config:
    """FP8 GEMMs (pretrain/model/fp8.py). Recipes: torch backend tensorwise | rowwise | delayed; te backend
    delayed | tensorwise | blockwise."""
    enabled: bool = False
    backend: Literal["torch", "te"] = "torch"  # torch: torch._scaled_mm; te: NVIDIA Transformer Engine
    recipe: Literal["tensorwise", "rowwise", "delayed", "blockwise"] = "tensorwise"
    format: Literal["hybrid", "e4m3"] = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients
    amax_history_len: int = 1024  # delayed scaling: steps of amax history
    amax_compute_algo: Literal["max", "most_recent"] = "max"  # delayed scaling: the history's max or its newest
    margin: int = 0  # delayed scaling: scales are divided by 2^margin
    bf16_first_layers: int = 0  # the first this many decoder layers stay bf16
    bf16_last_layers: int = 0  # the last this many decoder layers stay bf16
    min_weight_elements: int = 0  # GEMMs whose (global) weight is smaller stay bf16


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matrix multiplies, fp32 weights and optimizer
    fp8: Fp8Config = field(default_factory=Fp8Config)


@dataclass
class TrainConfig:
    iters: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables it
    stop_at_step: Optional[int] = None  # save and exit after this step (the schedule still plans for iters)
    time_limit_minutes: Optional[float] = None  # save and exit once this run has trained this long
    compile: bool = False  # torch.compile each decoder layer (collectives may stay outside the compiled code)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    fused: Optional[bool] = None  # null: fused where the device supports it (torch's AdamW)
    # auto: NVIDIA apex's FusedAdam where it can run (as model.norm_impl) unless fused=false, else torch's AdamW
    impl: Literal["auto", "torch", "apex"] = "auto"
    distributed: bool = False  # shard Adam states over the data x context-parallel ranks (ZeRO-1)


@dataclass
class SchedulerConfig:
    warmup_iters: int = 30
    decay: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    decay_iters: Optional[int] = None  # null: train.iters - warmup_iters
    min_lr: float = 1e-4  # floor of every decay
    wsd_decay_fraction: float = 0.2  # wsd: share of decay_iters spent in the final linear decay


def _default_sources() -> dict[str, SourceConfig]:
    return {"stdlib": SourceConfig(prefixes=["embedded:stdlib"])}


@dataclass
class DataConfig:
    tokenizer: Literal["byte", "hf", "sentencepiece"] = "byte"
    tokenizer_path: Optional[str] = None  # tokenizer.json (hf) or .model (sentencepiece)
    sources: dict[str, SourceConfig] = field(default_factory=_default_sources)
    phases: list[PhaseConfig] = field(default_factory=list)  # empty: one phase, sources in proportion to tokens
    split: str = "98,2"  # train,validation weights over each prefix's documents
    validation: dict[str, list[str]] = field(default_factory=dict)  # separate validation sets; then no split
    cache_dir: Optional[str] = None  # embedded corpora and sample indices; null: see the README
    prefetch: int = 2  # steps of batches prepared in the background
    # random token ids instead of the sources (benchmarks): sample i is a pure function of (run.seed, i)
    synthetic: bool = False


@dataclass
class ObjectiveConfig:
    name: Literal["ntp", "rlp"] = "ntp"  # next-token prediction, or RLP (pretrain/objectives/rlp.py)
    rlp: RLPConfig = field(default_factory=RLPConfig)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # null: <run.dir>/checkpoints
    interval: int = 100  # steps between saves; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto: latest in dir if any; none: start fresh; or a checkpoint folder
    # a fresh run starts from these weights (a checkpoint folder, or a checkpoint.dir: its latest), with a fresh
    # optimizer, schedule and data position; ignored when the run resumes its own checkpoint
    init_from: Optional[str] = None
    save_at_end: bool = True
    # copy the state to CPU memory and write it in the background while training goes on; `latest` moves only
    # once every file is written (pretrain/checkpoint.py)
    async_save: bool = False


@dataclass
class EvalConfig:
    interval: int = 50  # steps between evaluations; 0 disables it
    iters: int = 4  # global batches per evaluation


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    peak_tflops: Optional[float] = None  # the device's peak for MFU; null: from the table for H100/H200/A100


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run.dir, "checkpoints")

    def resolved(self, vocab_size: int) -> "Config":
        """A copy with every derived value written out: what a run actually used."""
        m, p = self.model, self.parallel
        return dataclasses.replace(
            self,
            model=dataclasses.replace(m, num_query_groups=m.query_groups, ffn_hidden_size=m.ffn_size,
                                      head_dim=m.head_size, vocab_size=vocab_size),
            parallel=dataclasses.replace(p, expert_tensor=p.expert_tensor or p.tensor),
            checkpoint=dataclasses.replace(self.checkpoint, dir=self.checkpoint_dir),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, world_size: int = 1) -> "Config":
        """Check values and their consistency for `world_size` ranks; raise one ConfigError listing all problems."""
        errors = Problems()
        self._validate_ranges(errors)
        if not errors:
            self._validate_consistency(errors, world_size)
        if errors:
            raise ConfigError("; ".join(errors.lines))
        return self

    def _validate_ranges(self, e: Problems) -> None:
        m, t, s = self.model, self.train, self.scheduler
        if not self.run.name or os.sep in self.run.name or self.run.name in (".", ".."):
            e.add(f"run.name={self.run.name!r}: name the run with one folder name (it names runs/<run.name>); "
                  "set run.dir for a path")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_multiple"):
            e.positive(f"model.{name}", getattr(m, name))
        for name in ("num_query_groups", "head_dim", "ffn_hidden_size", "vocab_size", "loss_chunk_tokens",
                     "max_position_embeddings"):
            if getattr(m, name) is not None:
                e.positive(f"model.{name}", getattr(m, name))
        e.positive("model.norm_eps", m.norm_eps)
        e.positive("model.rope_theta", m.rope_theta)
        e.positive("model.init_std", m.init_std)
        if self.logging.peak_tflops is not None:
            e.positive("logging.peak_tflops", self.logging.peak_tflops)
        if m.gpas.gate_grad_clip is not None:
            e.positive("model.gpas.gate_grad_clip", m.gpas.gate_grad_clip)
        p = self.parallel
        for name in ("tensor", "context", "pipeline", "expert", "virtual_pipeline", "expert_tensor",
                     "first_stage_layers", "last_stage_layers"):
            if getattr(p, name) is not None:
                e.positive(f"parallel.{name}", getattr(p, name))
        e.positive("parallel.timeout_minutes", p.timeout_minutes)
        e.positive("parallel.grad_bucket_mb", p.grad_bucket_mb)
        e.positive("train.iters", t.iters)
        e.positive("train.global_batch_size", t.global_batch_size)
        e.positive("train.micro_batch_size", t.micro_batch_size)
        e.non_negative("train.grad_clip", t.grad_clip)
        if t.stop_at_step is not None:
            e.positive("train.stop_at_step", t.stop_at_step)
        if t.time_limit_minutes is not None:
            e.positive("train.time_limit_minutes", t.time_limit_minutes)
        e.positive("optimizer.lr", self.optimizer.lr)
        e.non_negative("optimizer.weight_decay", self.optimizer.weight_decay)
        for name in ("beta1", "beta2"):
            value = getattr(self.optimizer, name)
            if not 0.0 <= value < 1.0:
                e.add(f"optimizer.{name}={value}: must be in [0, 1); 0.9 and 0.95 are usual")
        e.positive("optimizer.eps", self.optimizer.eps)
        e.non_negative("scheduler.warmup_iters", s.warmup_iters)
        if s.decay_iters is not None:
            e.positive("scheduler.decay_iters", s.decay_iters)
        e.non_negative("scheduler.min_lr", s.min_lr)
        if not 0.0 < s.wsd_decay_fraction <= 1.0:
            e.add(f"scheduler.wsd_decay_fraction={s.wsd_decay_fraction}: must be in (0, 1]; 0.1 to 0.2 is usual")
        e.non_negative("checkpoint.interval", self.checkpoint.interval)
        e.positive("checkpoint.keep_last", self.checkpoint.keep_last)
        e.non_negative("eval.interval", self.eval.interval)
        e.positive("eval.iters", self.eval.iters)
        e.positive("logging.interval", self.logging.interval)

    def _validate_consistency(self, e: Problems, world_size: int) -> None:
        m, t, s = self.model, self.train, self.scheduler
        if m.head_dim is None and m.hidden_size % m.num_attention_heads:
            e.add(
                f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                f"{m.num_attention_heads}: choose a head count that divides the hidden size, or set model.head_dim"
            )
        elif m.head_size % 2:
            which = (f"model.head_dim={m.head_dim}" if m.head_dim is not None else
                     f"model.hidden_size / model.num_attention_heads = {m.head_size}")
            e.add(f"{which} is odd: rotary embeddings need an even head dimension "
                  f"(set model.head_dim to an even width, such as {m.head_size + 1})")
        self._validate_rope_scaling(e)
        if m.num_attention_heads % m.query_groups:
            e.add(
                f"model.num_query_groups={m.query_groups} does not divide model.num_attention_heads="
                f"{m.num_attention_heads}: each query group must hold the same number of heads"
            )
        if m.gpas.gate_grad_clip is not None and not m.gpas.enabled:
            e.add("model.gpas.gate_grad_clip is set but model.gpas.enabled=false: enable GPAS or remove the clip")
        if t.stop_at_step is not None and t.stop_at_step > t.iters:
            e.add(f"train.stop_at_step={t.stop_at_step} is beyond train.iters={t.iters}: the run ends at train.iters")
        moe_problems(self, e)
        self._validate_recompute_and_compile(e)
        self._validate_kernels(e)
        for line in fp8_problems(self) + rlp_problems(self):
            e.add(line)
        if s.decay != "constant" and s.min_lr > self.optimizer.lr:
            e.add(f"scheduler.min_lr={s.min_lr} is above optimizer.lr={self.optimizer.lr}: lower the floor")
        if s.warmup_iters > t.iters:
            e.add(f"scheduler.warmup_iters={s.warmup_iters} exceeds train.iters={t.iters}: shorten the warmup")
        self._validate_data(e)
        self._validate_layout(e, world_size)

    def _validate_rope_scaling(self, e: Problems) -> None:
        r = self.model.rope_scaling
        if r.type is None:
            return
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            e.positive(f"model.rope_scaling.{name}", getattr(r, name))
        if r.high_freq_factor <= r.low_freq_factor:
            e.add(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed low_freq_factor="
                  f"{r.low_freq_factor} (Llama-3.1: 4 and 1): the blend between them divides by their difference")

    def _validate_recompute_and_compile(self, e: Problems) -> None:
        m = self.model
        if m.recompute_layers is not None:
            e.positive("model.recompute_layers", m.recompute_layers)
            if m.recompute != "full":
                e.add(f"model.recompute_layers={m.recompute_layers} counts the layers of model.recompute=full; "
                      f"set model.recompute=full, or remove it (model.recompute={m.recompute})")
        if m.recompute != "none" and m.moe.num_experts and m.moe.router.load_balancing == "global_aux_loss":
            e.add(f"model.recompute={m.recompute} with model.moe.router.load_balancing=global_aux_loss: the global "
                  "loss depends on the micro-batches routed so far, which a recomputed layer would see changed; "
                  "use aux_loss or seq_aux_loss, or model.recompute=none")
        if self.train.compile and m.recompute != "none":
            e.add(f"train.compile=true with model.recompute={m.recompute}: compiled checkpointing takes no "
                  "recompute contexts (the selective policy, the router's count-once flag); use one or the other")
        if self.train.compile:
            problem = compile_problem(self.run.device)
            if problem:
                e.add(f"train.compile=true: {problem}; or set train.compile=false")

    def _validate_kernels(self, e: Problems) -> None:
        """Only what holds on any machine: whether apex can run on this one is the trainer's check, on the device
        it got (`choose_kernels` in pretrain/trainer.py), so that `launch --dry-run` can plan a GPU run anywhere."""
        o = self.optimizer
        if o.impl == "apex" and o.fused is not None:
            e.add(f"optimizer.fused={str(o.fused).lower()} is an option of torch's AdamW and optimizer.impl=apex "
                  "runs apex's FusedAdam (always fused): remove optimizer.fused, or set optimizer.impl=torch")

    def sizes(self, world_size: int) -> Sizes:
        p = self.parallel
        return Sizes(world=world_size, tp=p.tensor, cp=p.context, pp=p.pipeline, ep=p.expert, etp=p.expert_tensor,
                     order=p.order, sp=p.sequence_parallel)

    def _validate_layout(self, e: Problems, world_size: int) -> None:
        """The layout against the world size and the model: every rule names its fields."""
        m, t, p = self.model, self.train, self.parallel
        sizes = self.sizes(world_size)
        try:
            sizes.check()
        except TopologyError as err:
            e.add(str(err))
            return
        if (p.virtual_pipeline or 1) > 1 and p.pipeline == 1:
            e.add(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1: interleaving splits "
                  "each pipeline stage into chunks; remove it or use more stages")
        try:
            chunks = pipeline_chunks(m.num_layers, p.pipeline, p.virtual_pipeline or 1, first=p.first_stage_layers,
                                     last=p.last_stage_layers)
        except TopologyError as err:
            e.add(str(err))
        else:
            fewest = min(sum(len(r) for r in stage) for stage in chunks)
            if m.recompute_layers is not None and m.recompute_layers > fewest:
                e.add(f"model.recompute_layers={m.recompute_layers} is more than the {fewest} layer(s) of the "
                      f"smallest pipeline stage: choose at most {fewest}, or null for all")
        tp, cp = p.tensor, p.context
        if m.num_attention_heads % tp:
            e.add(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={tp}: "
                  "each tensor-parallel rank needs whole heads")
        if m.query_groups % tp:
            e.add(f"model.num_query_groups={m.query_groups} is not divisible by parallel.tensor={tp}: each "
                  "tensor-parallel rank needs whole key/value heads (raise num_query_groups or lower tensor)")
        if m.vocab_size is not None and m.vocab_size % tp:
            e.add(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor={tp}: each rank holds an "
                  "equal slice of the vocabulary")
        if m.vocab_size is None and m.vocab_multiple % tp:
            e.add(f"model.vocab_multiple={m.vocab_multiple} is not divisible by parallel.tensor={tp}: the padded "
                  "vocabulary must split evenly")
        if m.ffn_size % tp:
            e.add(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tensor={tp}")
        split = 2 * cp * tp if cp > 1 else (tp if p.sequence_parallel else 1)
        if m.seq_length % split:
            why = (f"2 x parallel.context x parallel.tensor = {split}" if cp > 1
                   else f"parallel.tensor = {tp} (sequence parallelism)")
            e.add(f"model.seq_length={m.seq_length} is not divisible by {why}: choose a multiple of {split}")
        per_step = t.micro_batch_size * sizes.dp
        if t.global_batch_size % per_step:
            e.add(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x data-parallel size {sizes.dp} = {per_step}: "
                f"use a global batch of {max(per_step, t.global_batch_size // per_step * per_step)} "
                "or a smaller micro-batch"
            )
        elif (p.virtual_pipeline or 1) > 1 and (t.global_batch_size // per_step) % p.pipeline:
            micro = t.global_batch_size // per_step
            e.add(
                f"train.global_batch_size={t.global_batch_size} gives {micro} micro-batches per data-parallel rank "
                f"(micro_batch_size {t.micro_batch_size} x DP{sizes.dp}), not a multiple of parallel.pipeline="
                f"{p.pipeline}: the interleaved schedule (parallel.virtual_pipeline) runs micro-batches in groups "
                f"of one per stage; use a global batch of {(micro // p.pipeline + 1) * p.pipeline * per_step}"
            )

    def _validate_data(self, e: Problems) -> None:
        d = self.data
        try:
            parse_split(d.split)
        except ValueError as err:
            e.add(f"data.split={d.split!r}: {err}")
        if d.tokenizer != "byte" and not d.tokenizer_path:
            e.add(f"data.tokenizer={d.tokenizer} needs data.tokenizer_path (its tokenizer.json or .model file)")
        e.non_negative("data.prefetch", d.prefetch)
        if d.synthetic:  # no source is read: sources and split are ignored, a schedule or files asked for refused
            for name, value in (("data.phases", d.phases), ("data.validation", d.validation)):
                if value:
                    e.add(f"{name} is set but data.synthetic=true reads no data (random token ids): remove {name} "
                          f"({name}={'[]' if name == 'data.phases' else '{}'}) or set data.synthetic=false")
            return
        if not d.sources:
            e.add("data.sources is empty: name at least one source with its prefixes")
        for name, source in d.sources.items():
            field_name = f"data.sources.{name}"
            if not source.prefixes:
                e.add(f"{field_name}.prefixes is empty: list its dataset prefixes (or embedded:stdlib)")
            if source.weights is not None:
                if len(source.weights) != len(source.prefixes):
                    e.add(f"{field_name}.weights has {len(source.weights)} entries for {len(source.prefixes)} prefixes")
                _check_weights(e, f"{field_name}.weights", source.weights)
            if source.max_epochs is not None:
                e.positive(f"{field_name}.max_epochs", source.max_epochs)
        if d.validation and d.split != DataConfig.split:
            e.add(f"data.split={d.split!r} is unused when data.validation names validation sets: remove one of them")
        for name, prefixes in d.validation.items():
            if not prefixes:
                e.add(f"data.validation.{name} is empty: list its dataset prefixes")
        for k, phase in enumerate(d.phases):
            label = f"data.phases[{k}]" + (f" ({phase.name})" if phase.name else "")
            for source in phase.weights:
                if source not in d.sources:
                    close = difflib.get_close_matches(source, list(d.sources), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; sources are {', '.join(d.sources)}"
                    e.add(f"{label}.weights names an unknown source {source!r}{hint}")
            _check_weights(e, f"{label}.weights", list(phase.weights.values()))
            if phase.tokens is not None:
                e.positive(f"{label}.tokens", phase.tokens)
            if phase.fraction is not None and not 0 < phase.fraction <= 1:
                e.add(f"{label}.fraction={phase.fraction}: must be in (0, 1]")
        if d.phases and not e:
            try:
                phase_boundaries(d.phases, self.train.iters, self.train.global_batch_size * self.model.seq_length)
            except ScheduleError as err:
                e.add(str(err))


def _check_weights(e: Problems, name: str, weights: list[float]) -> None:
    if any(not (w >= 0 and math.isfinite(w)) for w in weights):
        e.add(f"{name}: weights must be zero or positive, got {weights}")
    elif not weights or sum(weights) == 0:
        e.add(f"{name}: all weights are zero; give at least one source a positive weight")


def compile_problem(device: str) -> Optional[str]:
    """Why torch.compile cannot run here, or None. On the CPU, inductor compiles C++ and needs a compiler."""
    if not hasattr(torch, "compile"):
        return f"this torch ({torch.__version__}) has no torch.compile"
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none is on PATH (install g++)"
    return None


def parse_split(split: str) -> tuple[float, float]:
    """'98,2' -> (0.98, 0.02): the train and validation shares of the documents."""
    parts = [p.strip() for p in split.split(",")]
    if len(parts) != 2:
        raise ValueError("expected two comma-separated weights, train and validation, like '98,2'")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError("weights must be numbers, like '98,2'") from None
    if min(weights) < 0 or weights[0] == 0:
        raise ValueError("weights must be non-negative and the train weight positive")
    total = sum(weights)
    return weights[0] / total, weights[1] / total
