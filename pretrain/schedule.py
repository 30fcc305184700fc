"""Learning rate as a pure function of the step: nothing to save but the step itself."""

from __future__ import annotations

import math

from pretrain.config import OptimizerConfig, SchedulerConfig


def learning_rate(step: int, total_steps: int, *, opt: OptimizerConfig, sched: SchedulerConfig) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup, then the decay, never below min_lr."""
    peak, floor = opt.lr, sched.min_lr
    if sched.warmup_iters and step <= sched.warmup_iters:
        return peak * step / sched.warmup_iters
    if sched.decay == "constant":
        return peak
    decay_iters = sched.decay_iters or max(1, total_steps - sched.warmup_iters)
    progress = min(1.0, (step - sched.warmup_iters) / decay_iters)
    if sched.decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif sched.decay == "linear":
        factor = 1.0 - progress
    else:  # wsd: warmup, stable at the peak, then a linear decay over the last wsd_decay_fraction
        stable = 1.0 - sched.wsd_decay_fraction
        factor = 1.0 if progress <= stable else 1.0 - (progress - stable) / sched.wsd_decay_fraction
    return max(floor, floor + (peak - floor) * factor)
