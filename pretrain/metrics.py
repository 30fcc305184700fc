"""What a run reports: one console line per logging interval, TensorBoard scalars, and `metrics.jsonl`.

Only the main rank writes. Losses on a logged line are the mean over the steps since
the previous logged line; throughput counts training steps only (not evaluation or
checkpoint time).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


class Metrics:
    def __init__(
        self, run_dir: str, *, total_steps: int, tokens_per_step: int, tensorboard: bool, enabled: bool = True,
        resume_step: Optional[int] = None, loss_window: Optional[list[float]] = None,
    ):
        """`resume_step`: continuing a run, whose records up to that step are kept (later ones, from a run that
        went on past its last checkpoint, are dropped); `loss_window`: the losses of its unfinished logging window."""
        self.total_steps, self.tokens_per_step, self.enabled = total_steps, tokens_per_step, enabled
        self.start_time = time.perf_counter()
        self.window_losses: list[float] = list(loss_window or [])
        self.window_steps, self.window_time = 0, 0.0  # steps timed in this process, for throughput
        self.train_time = 0.0
        self.steps_timed = 0
        self.compile_seconds: Optional[float] = None  # the first step of a compiled run, compilation included
        self.unreported_compile_seconds: Optional[float] = None
        self.first_loss: Optional[float] = None
        self.last_loss: Optional[float] = None
        self.last_val_loss: Optional[float] = None
        self.tokens = 0
        self.writer = None
        self.jsonl = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            kept = _records_up_to(path, resume_step) if resume_step is not None else []
            self.jsonl = open(path, "w", encoding="utf-8")
            self.jsonl.writelines(kept)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step)

    def record_step(self, loss: float, seconds: float, *, compiling: bool = False) -> None:
        """Every step: its loss and the wall time it took. The time of a step that compiled (`compiling`: the first
        of a run with train.compile) is reported once as `compile_seconds`, not counted in throughput."""
        self.window_losses.append(loss)
        self.tokens += self.tokens_per_step
        if self.first_loss is None:
            self.first_loss = loss
        self.last_loss = loss
        if compiling:
            self.compile_seconds = self.unreported_compile_seconds = seconds
            return
        self.window_steps += 1
        self.window_time += seconds
        self.train_time += seconds
        self.steps_timed += 1

    def log(self, step: int, values: dict) -> None:
        """Write one record for `step` with the window's mean loss and throughput, plus `values`."""
        if not self.window_losses:
            return
        loss = sum(self.window_losses) / len(self.window_losses)
        record = {"step": step, "loss": loss, **values}
        if self.window_steps:  # none when the window held only the compiling step
            record["tokens_per_sec"] = self.tokens_per_step * self.window_steps / max(self.window_time, 1e-9)
        if self.unreported_compile_seconds is not None:
            record["compile_seconds"], self.unreported_compile_seconds = self.unreported_compile_seconds, None
        self.window_losses, self.window_steps, self.window_time = [], 0, 0.0
        if "val_loss" in values:
            self.last_val_loss = values["val_loss"]
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, str):
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/{i}", v, step)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        self.writer.add_scalar(f"{key}/{k}", v, step)
                else:
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        elapsed = time.perf_counter() - self.start_time
        per_step = self.train_time / max(self.steps_timed, 1)
        eta = per_step * (self.total_steps - step)
        line = (
            f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {loss:.4f} | lr {record['lr']:.3e} "
            f"| grad norm {record['grad_norm']:.3f} | "
            + (f"{record['tokens_per_sec']:,.0f} tok/s" if "tokens_per_sec" in record else "compiling")
            + f" | elapsed {_duration(elapsed)} | eta {_duration(eta)}"
        )
        if "compile_seconds" in record:
            line += f" | first step with compilation {record['compile_seconds']:.1f} s"
        if values.get("phase", "all") != "all":  # a one-phase run's phase says nothing
            line += f" | phase {values['phase']}"
        if len(values.get("tokens_by_source", {})) > 1:
            line += " | tokens " + " ".join(f"{k} {_count(v)}" for k, v in values["tokens_by_source"].items())
        if "val_loss" in values:
            line += f" | val loss {values['val_loss']:.4f} (ppl {values['val_ppl']:.2f})"
        if "moe_aux_loss" in values:
            line += (f" | moe aux {values['moe_aux_loss']:.3f} imbalance {values['moe_load_imbalance']:.2f} "
                     f"dropped {values['moe_dropped_fraction']:.1%}")
        if "gpas_scale" in values:
            line += " | gpas " + " ".join(f"{s:.3f}" for s in values["gpas_scale"].values())
        print(line, flush=True)

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start_time
        parts = [f"done in {_duration(elapsed)}", f"{self.tokens:,} tokens trained"]
        if self.first_loss is not None:
            parts.append(f"loss {self.first_loss:.4f} -> {self.last_loss:.4f}")
        if self.last_val_loss is not None:
            parts.append(f"val loss {self.last_val_loss:.4f} (ppl {math.exp(min(self.last_val_loss, 50)):.2f})")
        return " | ".join(parts)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _records_up_to(path: str, step: int) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
