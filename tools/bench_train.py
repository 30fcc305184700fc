"""`python -m tools.bench_train CONFIG.yaml [section.key=value ...] [--warmup N] [--steps M] [--json PATH]`: how fast
foldtron trains a config, next to the model users would train instead.

Builds the config's `Trainer` (checkpoints, evaluation and TensorBoard off, in a temporary run folder),
runs N warm-up steps (the first compiles with `train.compile`), then times M steps of
`Trainer.train_step()`, and prints one table: tokens/s, model TFLOP/s per device and MFU (the FLOP
count of pretrain/metrics.py), peak CUDA memory, the share of the step time spent waiting for data (time
inside the loader's `next_step`, the host waiting for the prefetch thread: on CUDA the device may still be
busy with the previous step meanwhile, so this bounds what data costs from above) and the step time.
`--peak-tflops X` gives the MFU where the device is not in pretrain/metrics.py's table (the CPU, say);
`--no-baseline` leaves the baseline out. `--fp8 torch,te` adds a row per FP8 backend: the same config with
`precision.dtype=bf16` and `precision.fp8` on, measured the same way in the same process, with its speed
and last loss relative to foldtron's first row (a backend that cannot run here gets a note instead).

The baseline, in the same process and on the same device, is the same-shape model as Hugging Face
`transformers.LlamaForCausalLM` (SDPA attention, fp32 weights under bf16 autocast when foldtron runs
bf16, fused AdamW with the same hyper-parameters and weight decay on matrices only, `torch.compile` of
the whole model when the config compiles) in a plain PyTorch loop: random token ids of the same
micro-batch x (sequence + 1), the same number of micro-batches per step, the full logits and
`cross_entropy`, gradient clipping when the config clips. Its parameter count is printed next to
foldtron's (they match for a dense SwiGLU/RMSNorm config). Configs it cannot represent (MoE, GELU,
LayerNorm, GPAS, activation recomputation, several ranks) get foldtron's row and a note. The baseline
needs the `bench` extra (`pip install -e ".[bench]"`); without it, foldtron's row and a note.

Under torchrun every rank trains and rank 0 reports (tokens/s of the whole world, per-device TFLOP/s,
rank 0's memory and data wait). Clocks are read after `torch.cuda.synchronize`. `--json PATH` writes the
same numbers as JSON, rewritten after each measurement (foldtron, then the baseline, then FP8: a run stopped
at a time limit keeps what it measured; a measurement that crashes gets a note and exit status 1). Numbers
only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import shutil
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import torch

from pretrain.cli import (
    USER_ERRORS, ArgumentParser, UsageError, config_and_overrides, one_line, parse_command, run_tool,
)

USAGE = ("usage: python -m tools.bench_train CONFIG.yaml [section.key=value ...] [--warmup N] [--steps M] "
         "[--json PATH] [--peak-tflops X] [--no-baseline] [--fp8 torch,te]")
COLUMNS = ("", "params", "tokens/s", "TFLOP/s/device", "MFU", "peak GiB", "data wait", "step ms")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tools.bench_train", add_help=False)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--fp8", default="", help="backends to measure in FP8 too, comma-separated: torch,te")
    parser.add_argument("args", nargs="*")
    args = parser.parse_intermixed_args(argv)
    args.path, args.overrides = config_and_overrides(args.args)
    if args.warmup < 0 or args.steps < 1:
        raise UsageError(f"--warmup {args.warmup} --steps {args.steps}: warm-up steps must be 0 or more and timed "
                         "steps at least 1")
    args.fp8 = [b for b in args.fp8.split(",") if b]
    if set(args.fp8) - {"torch", "te"}:
        raise UsageError(f"--fp8 {','.join(args.fp8)}: the backends are torch and te (comma-separated)")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops {args.peak_tflops}: must be a positive number")
    return args


@dataclasses.dataclass(kw_only=True)
class Measurement:
    """One model's timed steps; `seconds` and `data_wait` cover the timed steps only."""

    params: int
    steps: int
    seconds: float
    data_wait: float
    peak_memory_gib: Optional[float]
    losses: list[float]

    def row(self, *, tokens_per_step: int, devices: int, flops_per_token: float, peak: Optional[float]) -> dict:
        from pretrain.metrics import throughput

        rates = throughput(tokens_per_step * self.steps / self.seconds, devices=devices,
                           flops_per_token=flops_per_token, peak_tflops=peak)
        return {
            "params": self.params, **rates, "mfu": rates.get("mfu"), "peak_memory_gib": self.peak_memory_gib,
            "data_wait_fraction": self.data_wait / self.seconds, "step_ms": 1000 * self.seconds / self.steps,
            "first_loss": self.losses[0], "last_loss": self.losses[-1],
        }


class WaitClock:
    """Wraps the loader's `next_step` and adds up the time spent inside it: the host waiting for the data."""

    def __init__(self, next_step: Callable):
        self.next_step, self.seconds = next_step, 0.0

    def __call__(self):
        start = time.perf_counter()
        try:
            return self.next_step()
        finally:
            self.seconds += time.perf_counter() - start


def bench_config(path: str, overrides: list[str], *, run_dir: str, steps: int):
    """The config with the benchmark's settings: nothing saved, evaluated or logged, in `run_dir`; `train.iters`
    kept (the data plan is the real run's), raised where the run would be shorter than `steps`."""
    from pretrain.config_loading import load_config

    forced = [f"run.dir={run_dir}", f"checkpoint.dir={run_dir}/checkpoints", "checkpoint.interval=0",
              "checkpoint.save_at_end=false", "checkpoint.resume=none", "eval.interval=0", "logging.tensorboard=false",
              "train.stop_at_step=null", "train.time_limit_minutes=null"]
    cfg = load_config(path, [*overrides, *forced])
    if cfg.train.iters < steps:
        cfg.train.iters = steps
        cfg.scheduler.warmup_iters = min(cfg.scheduler.warmup_iters, steps)
    return cfg


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_steps(step: Callable[[], float], clock: WaitClock, device: torch.device, *, warmup: int, steps: int,
                params: int) -> Measurement:
    """`warmup` untimed calls of `step` (it returns the loss), then `steps` timed ones."""
    reset_peak_memory(device)
    losses = [step() for _ in range(warmup)]
    synchronize(device)
    clock.seconds = 0.0
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    synchronize(device)
    return Measurement(params=params, steps=steps, seconds=time.perf_counter() - start, data_wait=clock.seconds,
                       peak_memory_gib=peak_memory_gib(device), losses=losses)


def run_foldtron(cfg, world_size: int, rank: int, *, warmup: int, steps: int):
    """foldtron's measurement, with what the report and the baseline need from the trainer."""
    from parallel.topology import Topology
    from pretrain.model import GPT
    from pretrain.run_description import describe
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, world_size, rank)
    try:
        description = describe(trainer)  # before the steps, after which it would say the run is done
        with torch.device("meta"):  # the whole model's parameters, whatever part of it this rank holds
            params = GPT(trainer.cfg.model, trainer.vocab_size, Topology.single()).num_parameters()
        clock = trainer.loader.next_step = WaitClock(trainer.loader.next_step)  # shadows the method
        trainer.model.train()
        measured = timed_steps(lambda: trainer.train_step()[0], clock, trainer.device, warmup=warmup, steps=steps,
                               params=params)
        context = {"cfg": trainer.cfg, "device": trainer.device, "vocab_size": trainer.vocab_size,
                   "tokenizer_vocab": trainer.tokenizer.vocab_size, "description": description,
                   "micro_batches": trainer.loader.micro_batches_per_step}
    finally:
        trainer.loader.close()
        trainer.metrics.close()
    return measured, context


def baseline_problem(cfg, world_size: int) -> Optional[str]:
    """Why Hugging Face's Llama cannot be the same model as this config, or None."""
    m = cfg.model
    reasons = [name for name, differs in (
        ("MoE", m.moe.num_experts is not None), ("GELU", m.activation != "swiglu"),
        ("LayerNorm", m.norm != "rmsnorm"), ("GPAS", m.gpas.enabled), ("query/key norms", m.qk_norm),
        (f"model.recompute={m.recompute}", m.recompute != "none"),
        (f"{world_size} ranks: the baseline runs on one device", world_size > 1),
    ) if differs]
    return ", ".join(reasons) or None


def llama_config(m, vocab_size: int):
    """The `transformers.LlamaConfig` of foldtron's model config `m` (resolved) with its padded vocabulary."""
    from transformers import LlamaConfig

    r = m.rope_scaling
    scaling = None if r.type is None else {
        "rope_type": r.type, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor, "original_max_position_embeddings": r.original_max_position_embeddings}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.query_groups, head_dim=m.head_size,
        hidden_act="silu", max_position_embeddings=max(m.seq_length, m.max_position_embeddings or 0),
        rope_theta=m.rope_theta, rope_scaling=scaling, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, initializer_range=m.init_std,
        use_cache=False, attn_implementation="sdpa",
    )


def run_baseline(cfg, device: torch.device, *, vocab_size: int, tokenizer_vocab: int, micro_batches: int,
                 warmup: int, steps: int) -> Measurement:
    """The same model in Hugging Face transformers, trained by a plain loop (see the module docstring)."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from pretrain.schedule import learning_rate

    m, t, o = cfg.model, cfg.train, cfg.optimizer
    torch.manual_seed(cfg.run.seed)
    with torch.device(device):  # initialised where it trains (a 1B model's initialisation on the host is slow)
        model = LlamaForCausalLM(llama_config(m, vocab_size))  # fp32 weights, as foldtron keeps them
    model.train()
    params = list(model.parameters())  # a tied table once
    fused = o.fused if o.fused is not None else device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused,
    )
    forward = torch.compile(model) if t.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision.dtype == "bf16"
                else contextlib.nullcontext())
    generator = torch.Generator().manual_seed(cfg.run.seed)
    clock = WaitClock(lambda: torch.randint(0, tokenizer_vocab, (t.micro_batch_size, m.seq_length + 1),
                                            generator=generator))
    state = {"step": 0}

    def step() -> float:
        state["step"] += 1
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"], t.iters, opt=o, sched=cfg.scheduler)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for _ in range(micro_batches):
            tokens = clock().to(device, non_blocking=True)
            with autocast:
                logits = forward(input_ids=tokens[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / micro_batches
            loss.backward()
            total += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        return float(total)

    return timed_steps(step, clock, device, warmup=warmup, steps=steps, params=sum(p.numel() for p in params))


def release(device: torch.device) -> None:
    """Free what the previous model left (the compiled graphs first: they hold on to the modules they were
    compiled from), so that the next one's peak is its own."""
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cells(name: str, row: dict) -> list[str]:
    tflops = row["tflops_per_device"]
    return [
        name, f"{row['params']:,}", f"{row['tokens_per_sec']:,.0f}",
        f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}",
        "-" if row["mfu"] is None else f"{row['mfu']:.1%}",
        "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}",
        f"{row['data_wait_fraction']:.2%}", f"{row['step_ms']:,.1f}",
    ]


def table(report: dict) -> str:
    """The report as text: what was run, then one row per model (a note where the baseline did not run)."""
    cells = [list(COLUMNS), _cells("foldtron", report["foldtron"])]
    cells += [_cells(f"foldtron FP8 {backend}", row) for backend, row in report["fp8"].items()]
    if report["baseline"] is not None:
        cells.append(_cells("baseline", report["baseline"]))
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = [
        f"{report['config']} on {report['device']}, {report['world_size']} rank(s), {report['dtype']}, compile "
        f"{'on' if report['compile'] else 'off'}: {report['global_batch_size']} x {report['seq_length']} tokens per "
        f"step ({report['micro_batches']} micro-batch{'es' if report['micro_batches'] > 1 else ''} of "
        f"{report['micro_batch_size']} per rank), "
        f"{report['warmup_steps']} warm-up + {report['timed_steps']} timed steps",
    ]
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if report["baseline_note"]:
        lines.append(f"baseline: {report['baseline_note']}")
    for backend, row in report["fp8"].items():
        speed = row["tokens_per_sec"] / report["foldtron"]["tokens_per_sec"]
        loss = row["last_loss"] / report["foldtron"]["last_loss"] - 1
        lines.append(f"FP8 {backend}: {speed:.2f}x the tokens/s of foldtron {report['dtype']}, last loss {loss:+.2%}")
    for backend, why in report["fp8_notes"].items():
        lines.append(f"FP8 {backend}: not measured ({why})")
    peak = report["peak_tflops"]
    lines.append(f"MFU against {peak:g} TFLOP/s per device" if peak else
                 "MFU: - (the device's peak is unknown: pass --peak-tflops)")
    return "\n".join(lines)


def measure_foldtron(args: argparse.Namespace, overrides: list[str], world_size: int, rank: int):
    """foldtron's measurement of the config with `overrides`, in a temporary run folder."""
    run_dir = tempfile.mkdtemp(prefix="bench_train-")
    try:
        cfg = bench_config(args.path, overrides, run_dir=run_dir, steps=args.warmup + args.steps)
        if cfg.train.compile and not args.warmup:
            raise UsageError("--warmup 0 with train.compile=true would time the compilation: warm up at least 1 step")
        return run_foldtron(cfg, world_size, rank, warmup=args.warmup, steps=args.steps)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def measure_fp8(args: argparse.Namespace, world_size: int, rank: int, *, shape: dict, device: torch.device
                ) -> tuple[dict, dict]:
    """The config again in FP8 (bf16 autocast around it) for each backend of `--fp8`: rows by backend, and why a
    backend has none (Transformer Engine not usable here, say)."""
    rows, notes = {}, {}
    for backend in args.fp8:
        overrides = [*args.overrides, "precision.dtype=bf16", "precision.fp8.enabled=true",
                     f"precision.fp8.backend={backend}"]
        try:
            measured, _ = measure_foldtron(args, overrides, world_size, rank)
        except USER_ERRORS as err:
            notes[backend] = str(err).splitlines()[0]
            continue
        except Exception as err:  # noqa: BLE001 - a kernel or memory failure costs this row, not the others
            notes[backend] = failed(err)
            continue
        finally:
            release(device)
        rows[backend] = measured.row(**shape)
    return rows, notes


def failed(err: Exception) -> str:
    """The note of a measurement that crashed; its traceback goes to stderr (the log of a device check)."""
    traceback.print_exc()
    return f"failed: {one_line(err)}"


def benchmark(args: argparse.Namespace, world_size: int, rank: int, *,
              publish: Callable[[dict], None] = lambda report: None) -> dict:
    """Every measurement and the report (the same on every rank; rank 0's numbers). `publish(report)` is called
    after each measurement with the report so far, so that a run stopped later (a time limit) keeps them."""
    from pretrain.metrics import model_flops_per_token, peak_tflops

    foldtron, ctx = measure_foldtron(args, args.overrides, world_size, rank)
    cfg, device = ctx["cfg"], ctx["device"]
    release(device)
    m, t = cfg.model, cfg.train
    peak = peak_tflops(device, cfg.precision.dtype, args.peak_tflops or cfg.logging.peak_tflops)
    shape = {"tokens_per_step": t.global_batch_size * m.seq_length, "devices": world_size,
             "flops_per_token": model_flops_per_token(m, ctx["vocab_size"]), "peak": peak}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {
        "config": args.path, "overrides": args.overrides, "device": f"{device} ({name})" if device.type == "cuda"
        else "cpu", "world_size": world_size, "dtype": cfg.precision.dtype, "compile": t.compile,
        "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
        "micro_batches": ctx["micro_batches"], "seq_length": m.seq_length, "tokens_per_step": shape["tokens_per_step"],
        "flops_per_token": shape["flops_per_token"], "peak_tflops": peak, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "description": ctx["description"], "foldtron": foldtron.row(**shape),
        "baseline": None, "baseline_note": "not measured yet", "cuda_memory_left_by_foldtron_gib": None,
        "fp8": {}, "fp8_notes": {backend: "not measured yet" for backend in args.fp8},
    }
    publish(report)
    # the baseline before FP8: under a time limit, the comparison the benchmark is for comes first
    # what foldtron left allocated, counted in the baseline's peak (0 unless something holds on to its tensors)
    report["cuda_memory_left_by_foldtron_gib"] = (torch.cuda.memory_allocated(device) / 2**30
                                                  if device.type == "cuda" else None)
    note = baseline_problem(cfg, world_size)
    note = f"not comparable ({note})" if note else ("skipped (--no-baseline)" if args.no_baseline else None)
    if note is None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            note = 'skipped: transformers is not installed (pip install -e ".[bench]")'
    if note is None:
        try:
            baseline = run_baseline(cfg, device, vocab_size=ctx["vocab_size"], tokenizer_vocab=ctx["tokenizer_vocab"],
                                    micro_batches=ctx["micro_batches"], warmup=args.warmup,
                                    steps=args.steps).row(**shape)
        except Exception as err:  # noqa: BLE001 - as measure_fp8's
            note = failed(err)
        else:
            report["baseline"] = baseline
            if baseline["params"] != foldtron.params:
                note = (f"its {baseline['params']:,} parameters differ from foldtron's {foldtron.params:,} "
                        "(a config field the baseline does not map)")
        finally:
            release(device)
    report["baseline_note"] = note
    publish(report)
    report["fp8"], report["fp8_notes"] = measure_fp8(args, world_size, rank, shape=shape, device=device)
    publish(report)
    return report


def main(argv: list[str]) -> int:
    args = parse_command(argv, parse_args, program="bench_train", usage=USAGE)
    if isinstance(args, int):
        return args

    crashed = []

    def write_json(report: dict) -> None:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in report.items() if k != "description"}, f, indent=2)
            f.write("\n")

    def work(world_size: int, rank: int) -> None:
        publish = write_json if rank == 0 and args.json_path else (lambda report: None)
        report = benchmark(args, world_size, rank, publish=publish)
        notes = [report["baseline_note"] or "", *report["fp8_notes"].values()]
        crashed.extend(note for note in notes if note.startswith("failed: "))
        if rank == 0:
            print(report["description"] + "\n\n" + table(report), flush=True)

    return run_tool("bench_train", work) or (1 if crashed else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
