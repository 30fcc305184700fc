"""`python -m tools.bench_checkpoint [CONFIG.yaml] [section.key=value ...] [--steps M] [--saves K]`: what a checkpoint
save costs the training loop, blocking against `checkpoint.async_save`, in one run.

Builds the config's `Trainer` (the quickstart by default; evaluation and TensorBoard off, in a temporary run
folder), warms up, then measures on the same trainer:
- K blocking saves, each followed by M steps: how long `save()` holds the loop;
- K background saves (`checkpoint.async_save`), each followed by M steps and the wait for the write to end:
  how long `save()` holds the loop (the copy to CPU memory), how much slower the M steps run while the
  writer works beside them, and what is left to wait for at the end.
Before each save, M steps without one give its baseline (measured next to it, so that a drifting machine
does not bias the comparison). "cost per save" is the time of the save and its M steps, minus M baseline
steps: what one save adds to the run. Under torchrun every rank trains and saves, and rank 0 reports.
Numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import torch

from pretrain.cli import ArgumentParser, UsageError, parse_command, run_tool

USAGE = "usage: python -m tools.bench_checkpoint [CONFIG.yaml] [section.key=value ...] [--steps M] [--saves K]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tools.bench_checkpoint", add_help=False)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    paths = [a for a in args.args if "=" not in a]
    if len(paths) > 1:
        raise UsageError(f"expected at most one config file, got {paths}")
    if args.steps < 1 or args.saves < 1:
        raise UsageError("--steps and --saves must be at least 1")
    args.path, args.overrides = (paths[0] if paths else None), [a for a in args.args if "=" in a]
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(trainer, n: int) -> float:
    """Seconds for n training steps."""
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    _sync(trainer.device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, world_size: int, rank: int) -> dict:
    from pretrain import checkpoint
    from pretrain.config_loading import load_config
    from pretrain.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench_checkpoint-")
    try:
        total = args.warmup + args.steps * 4 * args.saves
        cfg = load_config(args.path, [*args.overrides, f"run.dir={run_dir}", f"train.iters={total}",
                                      "eval.interval=0", "logging.tensorboard=false", "checkpoint.interval=0",
                                      "checkpoint.keep_last=1", "checkpoint.resume=none"])  # disk: 2 at most
        trainer = Trainer(cfg, world_size, rank)
        _steps(trainer, args.warmup)
        rows, baselines = {}, []
        for mode, background in (("blocking", None), ("background", checkpoint.Background())):
            trainer.background = background
            holds, during, waits, before = [], [], [], []
            for _ in range(args.saves):
                before.append(_steps(trainer, args.steps) / args.steps)  # the baseline, next to each save
                start = time.perf_counter()
                trainer.save()
                holds.append(time.perf_counter() - start)
                during.append(_steps(trainer, args.steps) / args.steps)
                start = time.perf_counter()
                trainer.finish_save()
                waits.append(time.perf_counter() - start)
            hold, step, wait, baseline = (statistics.mean(v) for v in (holds, during, waits, before))
            baselines += before
            rows[mode] = {"save_call_s": hold, "step_s_after_save": step, "wait_at_end_s": wait,
                          "step_s_without_save": baseline,
                          "cost_per_save_s": hold + wait + args.steps * (step - baseline)}
        size = sum(f["bytes"] for f in checkpoint.read_meta(checkpoint.resolve("auto", cfg.checkpoint_dir))
                   ["files"].values())
        return {"config": args.path or "(quickstart defaults)", "overrides": args.overrides,
                "device": str(trainer.device), "world_size": world_size, "checkpoint_bytes": size,
                "baseline_step_s": statistics.mean(baselines), "steps_after_each_save": args.steps,
                "saves": args.saves, **rows}
    finally:
        if rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)


def table(report: dict) -> str:
    lines = [f"checkpoint of {report['checkpoint_bytes'] / 2**20:.1f} MiB on {report['device']} x "
             f"{report['world_size']}; a step without saves: {report['baseline_step_s'] * 1e3:.1f} ms; "
             f"{report['saves']} saves, each followed by {report['steps_after_each_save']} steps",
             "", f"{'':<12}{'save() holds':>14}{'step after':>12}{'wait at end':>13}{'cost per save':>15}"]
    for mode in ("blocking", "background"):
        r = report[mode]
        lines.append(f"{mode:<12}{r['save_call_s'] * 1e3:>11.1f} ms{r['step_s_after_save'] * 1e3:>9.1f} ms"
                     f"{r['wait_at_end_s'] * 1e3:>10.1f} ms{r['cost_per_save_s'] * 1e3:>12.1f} ms")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_command(argv, parse_args, program="bench_checkpoint", usage=USAGE)
    if isinstance(args, int):
        return args

    def work(world_size: int, rank: int) -> None:
        report = measure(args, world_size, rank)
        if rank == 0:
            print(table(report), flush=True)

    return run_tool("bench_checkpoint", work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
