"""What a run reports: one console line per logging interval, TensorBoard scalars, and `metrics.jsonl`.

Only the main rank writes. Losses on a logged line are the mean over the steps since
the previous logged line; throughput counts training steps only (not evaluation or
checkpoint time).

Model FLOPs utilisation (MFU) counts the model's FLOPs, not the hardware's: per token,
6 x the parameters of every matrix multiply (forward 2, backward 4; with MoE the active
experts only: top-k of them plus the shared one) + 12 x layers x heads x head_dim x sequence
for attention's two matmuls over the whole sequence (not halved for causality, as in
Megatron-LM and nanoGPT); recomputation is not counted (it is hardware work, not model
work). Divided by the device's peak dense TFLOP/s for the run's dtype.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional


# Dense peak TFLOP/s per GPU (tensor cores, no sparsity), by a substring of torch.cuda.get_device_name().
# bf16; fp32 training against plain fp32 (with TF32 matmuls allowed, set logging.peak_tflops to the TF32 peak, or
# MFU can read above 100%).
PEAK_TFLOPS = {
    "bf16": [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)],
    "fp32": [("H100 PCIe", 51.2), ("H100 NVL", 60.0), ("H100", 66.9), ("H200", 66.9), ("A100", 19.5)],
}


def model_flops_per_token(m, vocab_size: int) -> float:
    """Training FLOPs per token of the model config `m` (see the module docstring)."""
    h, f, layers = m.hidden_size, m.ffn_size, m.num_layers
    d = m.head_size
    attention = h * (m.num_attention_heads + 2 * m.query_groups) * d + m.num_attention_heads * d * h
    mlp = (3 if m.activation == "swiglu" else 2) * h
    moe_layers = sum(m.moe.is_moe_layer(i) for i in range(layers)) if m.moe.num_experts else 0
    active = 0.0
    if moe_layers:
        expert = mlp * (m.moe.ffn_hidden_size or f)
        active = m.moe.top_k * expert + mlp * (m.moe.shared_expert_ffn_hidden_size or 0) + h * m.moe.num_experts
    matmuls = layers * attention + (layers - moe_layers) * mlp * f + moe_layers * active + vocab_size * h
    return 6.0 * matmuls + 12.0 * layers * m.num_attention_heads * d * m.seq_length


def peak_tflops(device, dtype: str, override: Optional[float]) -> Optional[float]:
    """The peak TFLOP/s of one device for `dtype` ("bf16"/"fp32"): `override` (logging.peak_tflops), else the table
    for a known GPU; None where unknown (the CPU), and then no MFU is reported."""
    if override:
        return override
    if getattr(device, "type", device) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.get(dtype, []) if key in name), None)


def throughput(tokens_per_sec: float, *, devices: int, flops_per_token: Optional[float],
               peak_tflops: Optional[float]) -> dict:
    """tokens/s in all and per device, model TFLOP/s per device and MFU (the last two where they are known)."""
    out = {"tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": tokens_per_sec / devices}
    if flops_per_token:
        out["tflops_per_device"] = flops_per_token * out["tokens_per_sec_per_device"] / 1e12
        if peak_tflops:
            out["mfu"] = out["tflops_per_device"] / peak_tflops
    return out


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
        resume_step: Optional[int] = None, loss_window: Optional[list[float]] = None, devices: int = 1,
        flops_per_token: Optional[float] = None, peak_tflops: Optional[float] = None, device=None,
        precision: str = "fp32",
    ):
        """`resume_step`: continuing a run, whose records up to that step are kept (later ones, from a run that
        went on past its last checkpoint, are dropped); `loss_window`: the losses of its unfinished logging window.
        `devices` (the world size), `flops_per_token` and `peak_tflops` give the per-device throughput and MFU;
        on a CUDA `device`, this rank's peak memory since the previous record is reported too."""
        self.total_steps, self.tokens_per_step, self.enabled = total_steps, tokens_per_step, enabled
        self.devices, self.flops_per_token, self.peak_tflops = devices, flops_per_token, peak_tflops
        self.cuda = device if getattr(device, "type", None) == "cuda" else None
        self.precision = precision  # "fp32", "bf16" or "fp8 <backend> <recipe> <format>": on every record
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
        record = {"step": step, "loss": loss, **values, "precision": self.precision}
        if self.window_steps:  # none when the window held only the compiling step
            record.update(self.throughput(self.tokens_per_step * self.window_steps / max(self.window_time, 1e-9)))
        record.update(self.memory())
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
        if self.precision != "fp32":
            line += f" | {self.precision}"
        if "mfu" in record:  # where the device's peak is known (metrics.jsonl has the TFLOP/s always)
            line += f" | {record['tflops_per_device']:.1f} TFLOP/s/device MFU {record['mfu']:.1%}"
        if "memory_allocated_gib" in record:
            line += f" | mem {record['memory_allocated_gib']:.1f}/{record['memory_reserved_gib']:.1f} GiB"
        if "compile_seconds" in record:
            line += f" | first step with compilation {record['compile_seconds']:.1f} s"
        if values.get("phase", "all") != "all":  # a one-phase run's phase says nothing
            line += f" | phase {values['phase']}"
        if len(values.get("tokens_by_source", {})) > 1:
            line += " | tokens " + " ".join(f"{k} {_count(v)}" for k, v in values["tokens_by_source"].items())
        if "val_loss" in values:
            line += f" | val loss {values['val_loss']:.4f} (ppl {values['val_ppl']:.2f})"
        if "rlp_reward" in values:
            line += (f" | reward {values['rlp_reward']:+.4f} ({values['rlp_positive_fraction']:.0%} > 0) thought "
                     f"{values['rlp_thought_length']:.1f} tok ({values['rlp_thought_hit_max']:.0%} at max) "
                     f"{values['rlp_generated_tokens_per_s']:,.0f} gen tok/s")
        if "moe_aux_loss" in values:
            line += (f" | moe aux {values['moe_aux_loss']:.3f} imbalance {values['moe_load_imbalance']:.2f} "
                     f"dropped {values['moe_dropped_fraction']:.1%}")
        if "gpas_scale" in values:
            line += " | gpas " + " ".join(f"{s:.3f}" for s in values["gpas_scale"].values())
        print(line, flush=True)

    def throughput(self, tokens_per_sec: float) -> dict:
        return throughput(tokens_per_sec, devices=self.devices, flops_per_token=self.flops_per_token,
                          peak_tflops=self.peak_tflops)

    def memory(self) -> dict:
        """Peak CUDA memory of this rank since the previous record, in GiB (nothing on the CPU)."""
        if self.cuda is None:
            return {}
        import torch

        out = {"memory_allocated_gib": torch.cuda.max_memory_allocated(self.cuda) / 2**30,
               "memory_reserved_gib": torch.cuda.max_memory_reserved(self.cuda) / 2**30}
        torch.cuda.reset_peak_memory_stats(self.cuda)
        return out

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
