"""What a model feature (MoE routing, GPAS, ...) may ask of the training loop, in one small interface.

The trainer holds a list of features and calls them at fixed points of a step without knowing what
is behind them: `begin_step` before the first micro-batch, `end_step` after the optimizer step,
`metrics` when it logs, and `separate_clip` when it clips gradients. Each feature lives next to
the modules it serves (`pretrain/model/moe.py`, `pretrain/model/gpas.py`) and is created by the
model (`GPT.features`) on every rank of a run that uses it, also on pipeline stages that hold none
of its layers: `metrics` may use collectives, and every rank calls it.
"""

from __future__ import annotations

from typing import Optional

import torch


class ModelFeature:
    """No-op defaults; a feature overrides what it needs."""

    def begin_step(self, micro_batches: int) -> None:
        """A training step with `micro_batches` micro-batches (per data-parallel rank) begins."""

    def end_step(self) -> None:
        """The optimizer has stepped."""

    def metrics(self) -> dict:
        """Values to log for the last step, the same on every rank (every rank calls this)."""
        return {}

    def separate_clip(self) -> Optional[tuple[set[torch.nn.Parameter], float]]:
        """Parameters whose gradients are clipped on their own, to this norm, and left out of the global clip."""
        return None
