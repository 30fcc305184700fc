"""The training loop: batches -> forward/backward per micro-batch -> clip -> step -> log -> eval -> save.

Everything that can fail on bad input (config, layout, checkpoint folder, dataset files,
a checkpoint of another model) is checked in `Trainer.__init__`, before the first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time

import torch

from data.indexed import DatasetError
from data.loader import DataLoader, eval_batches
from data.sources import DataPlan, TrainingStreams, make_plan
from data.synthetic import SyntheticPlan, SyntheticStreams
from data.tokenizers import TokenizerError, build_tokenizer
from parallel import apex_backend
from parallel.buckets import BucketLayout
from parallel.context_parallel import split_sequence
from parallel.data_parallel import GradReducer
from parallel.errors import FoldtronError
from parallel.optimizer import DistributedAdamW, PlainAdamW, adopt_flat_storage
from parallel.pipeline import PipelineSchedule, Stage, StageLink, describe_chunks, pipeline_chunks, run_schedule
from parallel.topology import Topology
from pretrain import checkpoint, distributed
from pretrain.checkpoint import CheckpointError
from pretrain.config import Config, ConfigError, parse_split
from pretrain.metrics import Metrics, model_flops_per_token, peak_tflops
from pretrain.model import GPT, model_signature, padded_vocab_size
from pretrain.model import fp8 as fp8_model
from pretrain.objectives import next_token_loss
from pretrain.objectives import rlp as rlp_objective
from pretrain.run_description import describe, indent
from pretrain.schedule import learning_rate


class NonFiniteError(FoldtronError, RuntimeError):
    """The loss became NaN or Inf; raised before the optimizer step, so no weight or checkpoint is touched."""


def build_gradients(model: torch.nn.Module, cfg: Config, topology: Topology, *, device: torch.device) -> GradReducer:
    """The gradient buffer in buckets (padded for sharding with optimizer.distributed) and its reducer."""
    params = [p for p in model.parameters() if p.requires_grad]
    layout = BucketLayout.build(
        params, replicas={name: len(topology.members[name]) for name in ("dp-cp", "edp")},
        bucket_elements=int(cfg.parallel.grad_bucket_mb * 2**20 / 4), sharded=cfg.optimizer.distributed,
    )
    return GradReducer(layout, topology, device)


def choose_kernels(cfg: Config, device: torch.device) -> tuple[Config, list[str]]:
    """`cfg` with model.norm_impl and optimizer.impl resolved for `device` ("torch" or "apex"), and why `auto` kept
    torch where it did. `auto` takes apex only where every rank can run it, so that all ranks compute alike; an
    explicit `apex` that some rank cannot run is a ConfigError on every rank, before any heavy work."""
    m, o = cfg.model, cfg.optimizer
    norm = apex_backend.norm_problem(device) if m.norm_impl != "torch" else None
    if o.impl == "auto" and o.fused is False:
        adam = "optimizer.fused=false asks for torch's unfused AdamW"
    else:
        adam = apex_backend.adam_problem(device) if o.impl != "torch" else None
    blocked = distributed.any_rank(norm is not None, adam is not None, device=device)  # on this rank or another
    chosen, kept = [], []
    for name, choice, problem, somewhere in (("model.norm_impl", m.norm_impl, norm, blocked[0]),
                                             ("optimizer.impl", o.impl, adam, blocked[1])):
        if choice == "apex" and somewhere:
            raise ConfigError(f"{name}=apex: {problem or 'apex cannot run on every rank'}; use auto or torch")
        if choice == "auto" and somewhere:
            kept.append(problem or "apex cannot run on every rank")
        chosen.append("torch" if choice == "torch" or somewhere else "apex")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, norm_impl=chosen[0]),
                              optimizer=dataclasses.replace(o, impl=chosen[1]))
    return cfg, list(dict.fromkeys(kept))


def build_optimizer(grads: GradReducer, cfg: Config, *, device: torch.device):
    """AdamW with weight decay on matrices only (not on norms, gates or biases), fused where supported (torch's, or
    apex's FusedAdam with optimizer.impl=apex, resolved by `choose_kernels`); with optimizer.distributed, its states
    sharded over the data groups, and the model's weights moved into one flat buffer laid out like the gradients
    (`adopt_flat_storage`: the one place where that happens)."""
    o = cfg.optimizer
    hyper = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay,
             "fused": o.fused if o.fused is not None else device.type in ("cuda", "cpu"), "impl": o.impl}
    if o.distributed:
        return DistributedAdamW(grads, adopt_flat_storage(grads.layout, device), **hyper)
    return PlainAdamW(grads, **hyper)


def load_tokenizer(cfg: Config):
    try:
        return build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    except TokenizerError as err:
        raise ConfigError(str(err)) from None


def plan_data(cfg: Config, tokenizer) -> DataPlan | SyntheticPlan:
    """The checked data plan of a validated config: what tools.blend_plan prints and the trainer reads
    (with data.synthetic, random ids below the tokenizer's vocabulary: no source is opened)."""
    t, d = cfg.train, cfg.data
    if d.synthetic:
        return SyntheticPlan(total_steps=t.iters, global_batch=t.global_batch_size, seq_length=cfg.model.seq_length,
                             vocab_size=tokenizer.vocab_size)
    return make_plan(
        d.sources, d.phases, validation=d.validation, split=parse_split(d.split), total_steps=t.iters,
        global_batch=t.global_batch_size, seq_length=cfg.model.seq_length, vocab_size=tokenizer.vocab_size,
        cache_dir=d.cache_dir,
    )


def data_signature(cfg: Config) -> str:
    """What the mapping step -> samples depends on; resuming under another one would read another stream.
    (train.iters counts only when phases are given: it moves their boundaries.)"""
    d, t = cfg.data, cfg.train
    parts = {
        "tokenizer": [d.tokenizer, d.tokenizer_path], "sources": d.sources, "phases": d.phases, "split": d.split,
        "validation": d.validation, "seq_length": cfg.model.seq_length, "global_batch": t.global_batch_size,
        "seed": cfg.run.seed, "iters": t.iters if d.phases else None,
    }
    if d.synthetic:  # only when set, so that the signatures of checkpoints written before the field stay valid
        parts["synthetic"] = True
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: Config, world_size: int = 1, rank: int = 0):
        cfg.validate(world_size)
        self.device = distributed.setup(cfg, world_size, rank)
        cfg, self.kept_torch = choose_kernels(cfg, self.device)
        f = cfg.precision.fp8
        problem = fp8_model.device_problem(self.device, f.backend) if f.enabled else None
        if problem:  # before any heavy work
            raise ConfigError(f"precision.fp8.enabled=true with backend={f.backend}: {problem}; or set "
                              "precision.fp8.enabled=false")
        self.topology = topology = Topology.build(cfg.sizes(world_size), rank,
                                                  timeout=distributed.collective_timeout(cfg))
        self.is_main = rank == 0
        self.tokenizer = load_tokenizer(cfg)
        vocab_size = cfg.model.vocab_size or padded_vocab_size(self.tokenizer.vocab_size, cfg.model.vocab_multiple)
        if vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} ids")
        self.cfg = cfg = cfg.resolved(vocab_size)
        self.vocab_size = vocab_size
        p = cfg.parallel
        self.chunks = pipeline_chunks(cfg.model.num_layers, p.pipeline, p.virtual_pipeline or 1,
                                      first=p.first_stage_layers, last=p.last_stage_layers)

        self.ckpt_dir = cfg.checkpoint_dir
        checkpoint.check_writable(self.ckpt_dir)
        self.resume_from = checkpoint.resolve(cfg.checkpoint.resume, self.ckpt_dir,
                                              announce=lambda line: print(line, flush=True) if self.is_main else None)
        meta = checkpoint.read_meta(self.resume_from) if self.resume_from else {"step": 0, "consumed_samples": 0}
        checkpoint.check_no_later_checkpoints(self.ckpt_dir, meta["step"])
        # another layout loads too (the keys name tensors, not ranks); only the random states stay behind
        self.resharded_from = None
        if self.resume_from:
            checkpoint.check_model(self.resume_from, meta, model_signature=model_signature(cfg.model))
            if meta.get("layout") != self.layout():
                self.resharded_from = meta.get("layout")
            if meta.get("data_signature", data_signature(cfg)) != data_signature(cfg):
                raise CheckpointError(
                    f"{self.resume_from} was trained with other data settings (sources, phases, split, synthetic, "
                    "seq_length, global batch, seed or, with phases, train.iters): resuming would read another stream; "
                    "resume with the same settings, or start a new run.dir"
                )

        # weights only, into a fresh run (a run that resumes its own checkpoint continues from that instead)
        self.init_from = None
        # where an imported model came from (tools/convert_checkpoint.py): kept in every checkpoint after it, so
        # that an export restores its exact vocabulary and config
        self.hf_origin = meta.get("hf")
        if cfg.checkpoint.init_from and not self.resume_from:
            self.init_from = checkpoint.resolve_init(cfg.checkpoint.init_from)
            init_meta = checkpoint.read_meta(self.init_from)
            self.hf_origin = init_meta.get("hf")
            checkpoint.check_model(f"checkpoint.init_from={self.init_from}:", init_meta,
                                   model_signature=model_signature(cfg.model),
                                   fix="configure the model it holds (its config.yaml beside the checkpoints "
                                       "says which)")

        t, d = cfg.train, cfg.data
        eval_samples = cfg.eval.iters * t.global_batch_size if cfg.eval.interval else 0
        self.plan, self.data = distributed.rank0_first(lambda: self._build_data(eval_samples))

        torch.manual_seed(cfg.run.seed)
        self.stage = Stage.of(topology, self.chunks, tie_embeddings=cfg.model.tie_embeddings)
        self.model = GPT(cfg.model, vocab_size, topology, stage=self.stage).to(self.device)
        local_tokens = cfg.model.seq_length // topology.cp // (topology.tp if topology.sequence_parallel else 1)
        self.link = StageLink(topology, (t.micro_batch_size, local_tokens, cfg.model.hidden_size),
                              dtype=torch.float32, device=self.device)
        self.model.init_parameters(cfg.run.seed)
        self.fp8 = fp8_model.apply_fp8(self.model, cfg.precision.fp8, topology, num_layers=cfg.model.num_layers,
                                       device=self.device)
        if cfg.train.compile:
            for layer in self.model.layers.values():
                layer.compile()  # in place: the parameters keep their names (and their placements)
        self.features = self.model.features() + ([self.fp8] if self.fp8 is not None else [])
        self.grads = build_gradients(self.model, cfg, topology, device=self.device)
        self.optimizer = build_optimizer(self.grads, cfg, device=self.device)
        self.rlp = self._build_rlp() if cfg.objective.name == "rlp" else None
        # FP8 state loads only into the same kind; else (bf16 -> FP8, another recipe) the histories start afresh
        self.fp8_afresh = bool(self.resume_from and self.fp8_state() and meta.get("fp8_state") != self.fp8_state())
        # the EMA teacher resumes with its run; it starts from the loaded weights otherwise (phi <- theta)
        teacher_saved = self.rlp is not None and self.resume_from and meta.get("rlp_teacher", False)
        if self.resume_from:
            meta = checkpoint.load(self.resume_from, model=self.model, optimizer=self.optimizer, rank=topology.rank,
                                   fp8=None if self.fp8_afresh else self.fp8,
                                   teacher=self.rlp.teacher.model if teacher_saved else None,
                                   restore_rng=self.resharded_from is None)
            if self.resharded_from is not None:  # no rank of this layout had a counterpart in the saving one
                torch.manual_seed(hash((cfg.run.seed, meta["step"], topology.rank)) % 2**63)
        elif self.init_from:
            checkpoint.load_weights(self.init_from, model=self.model)
        self.teacher_afresh = self.rlp is not None and not teacher_saved
        if self.teacher_afresh:
            self.rlp.teacher.reset()
        self.step = meta["step"]
        self.last_saved = self.step if self.resume_from else None
        self.background = checkpoint.Background() if cfg.checkpoint.async_save else None
        self.pending_save: checkpoint.PendingSave | None = None

        self.loader = DataLoader(
            self.data, t.global_batch_size, t.micro_batch_size, dp_rank=topology.dp_rank, dp_size=topology.dp,
            consumed_samples=meta["consumed_samples"], prefetch=d.prefetch, pin_memory=self.device.type == "cuda",
        )
        micro_batches, chunks = self.loader.micro_batches_per_step, len(self.chunks[0])
        self.schedule = PipelineSchedule(topology.pp, micro_batches, chunks)
        self.eval_schedule = PipelineSchedule(topology.pp, cfg.eval.iters * micro_batches, chunks, train=False)
        self.source_samples = self.data.schedule.counts(0, meta["consumed_samples"])
        self.tokens_per_step = t.global_batch_size * cfg.model.seq_length
        self.metrics = Metrics(
            cfg.run.dir, total_steps=t.iters, tokens_per_step=self.tokens_per_step, tensorboard=cfg.logging.tensorboard,
            enabled=self.is_main, devices=topology.world_size, device=self.device,
            flops_per_token=model_flops_per_token(cfg.model, vocab_size),
            peak_tflops=peak_tflops(self.device, cfg.precision.dtype, cfg.logging.peak_tflops),
            resume_step=self.step if self.resume_from else None, loss_window=meta.get("loss_window", []),
            precision=fp8_model.precision_label(cfg.precision.fp8) if self.fp8 is not None else cfg.precision.dtype,
        )

    def _build_rlp(self) -> rlp_objective.RLP:
        cfg, tokenizer = self.cfg, self.tokenizer
        try:
            think_ids = rlp_objective.think_ids_of(cfg.objective.rlp, tokenizer, vocab_size=self.vocab_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return rlp_objective.RLP(
            cfg.objective.rlp, model=self.model, topology=self.topology, seed=cfg.run.seed,
            seq_length=cfg.model.seq_length, think_ids=think_ids, eod=tokenizer.eod,
            vocab_limit=min(self.vocab_size, max(tokenizer.vocab_size, max(think_ids) + 1)), autocast=self.autocast,
            device=self.device,
        )

    def layout(self) -> dict:
        """The parallel layout and the optimizer's sharding, recorded in each checkpoint: a resume in the same one
        restores the random states of the ranks (any layout loads the tensors)."""
        o, p = self.cfg.optimizer, self.cfg.parallel
        return {**self.topology.layout(), "pipeline_layers": describe_chunks(self.chunks),
                "distributed_optimizer": o.distributed, "grad_bucket_mb": p.grad_bucket_mb if o.distributed else None}

    def _build_data(self, eval_samples: int) -> tuple[DataPlan | SyntheticPlan, TrainingStreams | SyntheticStreams]:
        plan = plan_data(self.cfg, self.tokenizer)
        if isinstance(plan, SyntheticPlan):
            return plan, SyntheticStreams(plan, seed=self.cfg.run.seed, eval_samples=eval_samples)
        streams = TrainingStreams(plan, seed=self.cfg.run.seed, tokenizer=self.tokenizer, eval_samples=eval_samples,
                                  cache_dir=self.cfg.data.cache_dir)
        streams.build_indices()  # now, on rank 0 first: no rank builds or reads a half-written cache later
        return plan, streams

    # ------------------------------------------------------------------ one step

    @contextlib.contextmanager
    def autocast(self):
        """The forward pass's precision: bf16 autocast, and within it the FP8 backend's context (TE's)."""
        with contextlib.ExitStack() as stack:
            if self.cfg.precision.dtype == "bf16":
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            if self.fp8 is not None:
                stack.enter_context(self.fp8.autocast())
            yield

    def fp8_state(self) -> str | None:
        """What the FP8 state in a checkpoint depends on (see Fp8Feature.state_kind); None: no FP8 state."""
        return self.fp8.state_kind() if self.fp8 is not None else None

    def stage_forward(self, tokens: torch.Tensor, received: torch.Tensor | None, chunk: int = 0) -> torch.Tensor:
        """One of this stage's chunks on a micro-batch [batch, seq + 1]: the first chunk of the model starts
        from its token ids, the others from the hidden states `received` from the previous one; the last
        returns the mean next-token loss of this rank's tokens, the others their hidden states. Under
        context parallelism a rank holds two pieces of every sequence, at their true positions."""
        tp = self.topology
        tokens = tokens.to(self.device, non_blocking=True)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        ids, labels, positions = (split_sequence(x, tp.cp_rank, tp.cp) for x in (ids, labels, positions))
        last = self.stage.ends_model(chunk)
        with self.autocast():  # the last chunk returns per-token losses: the logits are never held at once
            output = self.model(ids if self.stage.starts_model(chunk) else received, positions, chunk,
                                labels=labels if last else None)
        return next_token_loss(output) if last else output

    def mean_over_stages(self, total: torch.Tensor) -> torch.Tensor:
        """A loss summed on the last stage, averaged over DP x CP and sent to every stage, on this rank's device
        (`total` is a zero there on the other stages): no host sync."""
        tp = self.topology
        value = distributed.mean_over(total, tp.dp_cp_group, tp.dp * tp.cp)
        if tp.pp > 1:
            torch.distributed.broadcast(value, src=tp.members["pp"][-1], group=tp.groups["pp"])
        return value

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch (RLP: objective.rlp.ppo_epochs of them on its rollouts); returns
        (loss, grad norm) of the last, the same on every rank. On a GPU the host waits for the device where it
        reads these two (see accumulate_gradients for the rest)."""
        step = self.step + 1
        lr = learning_rate(step, self.cfg.train.iters, opt=self.cfg.optimizer, sched=self.cfg.scheduler)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self.step_inputs(step)
        for _ in range(self.cfg.objective.rlp.ppo_epochs if self.rlp is not None else 1):  # RLP reuses its rollouts
            loss_value = float(self.accumulate_gradients(micro_batches))  # the loss, read: a host sync
            if not math.isfinite(loss_value):
                raise NonFiniteError(
                    f"the loss is {loss_value} at step {step}: lower optimizer.lr, raise scheduler.warmup_iters, "
                    "or set train.grad_clip; no weights were updated and no checkpoint was written"
                )
            grad_norm = self.clip_gradients()
            if not math.isfinite(grad_norm):
                raise NonFiniteError(
                    f"the gradient norm is {grad_norm} at step {step} (loss {loss_value:.4f}): lower optimizer.lr or "
                    "use precision.dtype=fp32; no weights were updated and no checkpoint was written"
                )
            self.optimizer.step()
            for feature in self.features:
                feature.end_step()
            if self.rlp is not None:
                self.rlp.end_update()
        self.step = step
        return loss_value, grad_norm

    def next_micro_batches(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch (host tensors [micro, seq + 1]), counted by source
        and checked against the vocabulary."""
        consumed = self.loader.consumed_samples
        micro_batches = self.loader.next_step()
        self.source_samples += self.data.schedule.counts(consumed, self.loader.consumed_samples)
        self.check_token_range(micro_batches)
        return micro_batches

    def step_inputs(self, step: int) -> list:
        """What the micro-batches of step `step` compute on: their samples, or for RLP their rollouts (sampled
        here, without gradients)."""
        micro_batches = self.next_micro_batches()
        if self.rlp is None:
            return micro_batches
        return [self.rlp.rollout(batch, step=step, micro_batch=i) for i, batch in enumerate(micro_batches)]

    def forward_backward(self) -> float:
        """Gradients of the next global batch, reduced over the data-parallel ranks; returns its mean loss, read
        on the host: the step's one host sync for the loss, which the loop needs to stop on NaN and to log."""
        return float(self.accumulate_gradients(self.step_inputs(self.step + 1)))

    def accumulate_gradients(self, micro_batches: list) -> torch.Tensor:
        """The gradients of `micro_batches` (samples; for RLP their rollouts), the loss kept on the device. The
        micro-batches run through the pipeline schedule (one stage: a plain accumulation loop). On a GPU, in a
        dense next-token step, the host waits for the device only in the token-range check, once per step before
        any micro-batch and only with several ranks: the batches are copied without blocking, and an NCCL
        collective's wait makes the compute stream wait for it, not the host (tests/test_devices.py checks one
        GPU under torch.cuda.set_sync_debug_mode). RLP's rollouts read their samples on the host."""
        self.grads.zero()
        count = len(micro_batches)
        for feature in self.features:
            feature.begin_step(count)

        def forward(i: int, chunk: int, received):
            if self.rlp is not None:  # one stage (the config refuses pipelines for RLP)
                return self.rlp.loss(micro_batches[i]) / count
            output = self.stage_forward(micro_batches[i], received, chunk)
            return output / count if self.stage.ends_model(chunk) else output  # the loss: a mean over micro-batches

        losses = run_schedule(
            self.schedule, self.link, forward,
            before_backward=lambda i, chunk: self.grads.start_micro_batch(last=i == count - 1),
        )
        self.grads.finish()
        total = sum(loss.detach() for loss in losses) if losses else torch.zeros((), device=self.device)
        return self.mean_over_stages(total)

    def check_token_range(self, micro_batches: list[torch.Tensor]) -> None:
        """Ids outside the vocabulary mean data made with another tokenizer; say so (on every rank together)
        instead of crashing the embedding kernel. The micro-batches are still host tensors here (they move to
        the device in `stage_forward`), so their min and max cost no device sync; deciding on every rank
        together does (`any_rank`, a one-element all-reduce read back), once per step with several ranks. It
        cannot wait until the loss is read: on CUDA an id outside the table is a device-side assert, which
        ends the process, so the step must not start."""
        low = min(int(t.min()) for t in micro_batches)
        high = max(int(t.max()) for t in micro_batches)
        (bad,) = distributed.any_rank(low < 0 or high >= self.vocab_size, device=self.device)
        if bad:
            raise DatasetError(
                f"the data holds token ids outside the model's "
                f"{self.vocab_size} ids (data.tokenizer={self.cfg.data.tokenizer}): the dataset was made with "
                "another tokenizer; use its tokenizer or set model.vocab_size"
            )

    def clip_gradients(self) -> float:
        """Clip by the global norm over every rank, the parameters a model feature clips on its own (its
        `separate_clip`) separately; returns the norm of the others before clipping. Each norm is read on the
        host (on a GPU a host sync, once per step and once per separate clip): it decides whether to clip, and
        the loop stops on an infinite one before the optimizer step."""
        apart: set = set()
        for params, max_norm in filter(None, (f.separate_clip() for f in self.features)):
            selected = params.__contains__
            norm = self.grads.grad_norm(selected)
            if norm > max_norm:
                self.grads.scale(max_norm / (norm + 1e-6), selected)
            apart |= params
        others = lambda p: p not in apart  # noqa: E731
        norm = self.grads.grad_norm(others)
        clip = self.cfg.train.grad_clip
        if clip > 0 and norm > clip:
            self.grads.scale(clip / (norm + 1e-6), others)
        return norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss on the fixed batches of each validation set (a source's held-out documents, or data.validation)."""
        self.model.eval()
        t, tp = self.cfg.train, self.topology
        by_source = {}
        for stream in self.data.validation:
            batches = list(eval_batches(stream, t.global_batch_size, t.micro_batch_size, iters=self.cfg.eval.iters,
                                        dp_rank=tp.dp_rank, dp_size=tp.dp))
            self.check_token_range(batches)
            outputs = run_schedule(self.eval_schedule, self.link,
                                      lambda i, chunk, received: self.stage_forward(batches[i], received, chunk))
            total = sum(outputs) / len(outputs) if outputs else torch.zeros((), device=self.device)
            by_source[stream.name] = float(self.mean_over_stages(total))
        self.model.train()
        return by_source

    def save(self) -> None:
        meta = {
            "consumed_samples": self.loader.consumed_samples,
            "model_signature": model_signature(self.cfg.model),
            "data_signature": data_signature(self.cfg),
            "layout": self.layout(),
            "fp8_state": self.fp8_state(),
            "rlp_teacher": self.rlp is not None,
            "loss_window": self.metrics.window_losses,  # so a resumed run logs the same window means
            "config": self.cfg.to_dict(),
            **({"hf": self.hf_origin} if self.hf_origin else {}),
        }
        self.finish_save()  # one save in flight at a time
        saved = checkpoint.save(
            self.ckpt_dir, self.step, model=self.model, optimizer=self.optimizer, topology=self.topology, meta=meta,
            keep_last=self.cfg.checkpoint.keep_last, fp8=self.fp8,
            teacher=self.rlp.teacher.model if self.rlp is not None else None, background=self.background,
        )
        self.last_saved = self.step
        if isinstance(saved, checkpoint.PendingSave):
            self.pending_save = saved
        elif self.is_main:
            print(f"saved checkpoint {saved}", flush=True)

    def finish_save(self, *, if_done: bool = False) -> None:
        """Complete the checkpoint being written in the background, if any (on every rank together); with
        `if_done`, only if no rank is still writing (the ranks agree on it: one small all-reduce per step while
        a write is in flight)."""
        if self.pending_save is None:
            return
        if if_done and distributed.any_rank(not self.pending_save.done(), device=self.device)[0]:
            return
        pending, self.pending_save = self.pending_save, None
        path = pending.finish()
        if self.is_main:
            print(f"saved checkpoint {path} (written in the background)", flush=True)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            os.makedirs(cfg.run.dir, exist_ok=True)
            with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
            print("resolved config:\n" + indent(cfg.to_yaml()), flush=True)
            print(describe(self), flush=True)
        self.model.train()
        t = cfg.train
        last_step = min(t.iters, t.stop_at_step or t.iters)
        deadline = time.perf_counter() + 60 * t.time_limit_minutes if t.time_limit_minutes else math.inf
        try:
            while self.step < last_step:
                start = time.perf_counter()
                loss, grad_norm = self.train_step()
                # the first step of a compiled run compiles: its time is reported apart from the step times
                compiling = cfg.train.compile and self.metrics.compile_seconds is None
                self.metrics.record_step(loss, time.perf_counter() - start, compiling=compiling)
                step = self.step
                evaluating = bool(self.data.validation) and cfg.eval.interval and step % cfg.eval.interval == 0
                validation = self.evaluate() if evaluating else None
                if evaluating or step % cfg.logging.interval == 0 or step == t.iters:
                    self.metrics.log(step, self.step_record(grad_norm, validation))
                self.finish_save(if_done=True)
                if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                    self.save()
                if t.time_limit_minutes and distributed.any_rank(time.perf_counter() > deadline, device=self.device)[0]:
                    if self.is_main:
                        print(f"train.time_limit_minutes={t.time_limit_minutes} reached at step {step}", flush=True)
                    break
            if (cfg.checkpoint.save_at_end or self.step < t.iters) and self.last_saved != self.step:
                self.save()  # an early stop always saves, so the run can resume
            self.finish_save()
        finally:
            self.loader.close()
            self.metrics.close()
        summary = self.metrics.summary()
        if self.is_main:
            print(summary, flush=True)
        return {"step": self.step, "first_loss": self.metrics.first_loss, "last_loss": self.metrics.last_loss,
                "val_loss": self.metrics.last_val_loss}

    def step_record(self, grad_norm: float, validation: dict[str, float] | None) -> dict:
        """What is logged for the last step: optimizer and data state, the validation losses by source (when it
        evaluated) and every model feature's metrics."""
        schedule, seq = self.data.schedule, self.cfg.model.seq_length
        record = {
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "consumed_samples": self.loader.consumed_samples,
            "phase": schedule.phase_names[schedule.phase_of(self.loader.consumed_samples - 1)],
            "phase_index": schedule.phase_of(self.loader.consumed_samples - 1),  # a number TensorBoard can plot
            "tokens_by_source": {n: int(c) * seq for n, c in zip(schedule.source_names, self.source_samples)},
        }
        if validation is not None:
            record["val_loss"] = sum(validation.values()) / len(validation)
            record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
            if len(validation) > 1:
                record["val_loss_by_source"] = validation
        for feature in self.features:
            record.update(feature.metrics())
        if self.rlp is not None:
            record.update(self.rlp.metrics())
        return record


def train(cfg: Config, world_size: int = 1, rank: int = 0) -> dict:
    return Trainer(cfg, world_size, rank).run()
