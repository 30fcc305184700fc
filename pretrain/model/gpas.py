"""GPAS: gradient-preserving activation scaling (arXiv 2506.22049).

Pre-LN residual streams grow layer after layer. GPAS shrinks the forward value by
`1 - silu(a)` while the gradient into the activations stays the identity:

    out = x - silu(a) * x.detach()

so d out / d x = 1 and d out / d a = -silu'(a) * x. The gate `a` starts at 0, where
silu(0) = 0: a fresh model is exactly the model without GPAS.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.pipeline import gather_over_stages
from parallel.placement import replicated
from pretrain.model.features import ModelFeature


class GPASGate(nn.Module):
    """One learnable scalar gate; a decoder layer applies it after each of its residual adds. Under sequence
    parallelism it sees only this rank's tokens (its gradient is summed over TP)."""

    def __init__(self, *, sequence_parallel: bool):
        super().__init__()
        self.gate = replicated(nn.Parameter(torch.zeros(())), partial_over_tp=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - F.silu(self.gate).to(x.dtype) * x.detach()

    def scale(self) -> float:
        """The forward scale 1 - silu(a), logged per layer."""
        return float(1.0 - F.silu(self.gate.detach()))


class GPASFeature(ModelFeature):
    """Logs every layer's scale (`gpas_scale`, gathered over the pipeline stages) and, with
    `model.gpas.gate_grad_clip`, clips the gates' gradients on their own."""

    def __init__(self, gates: dict[str, GPASGate], topology, gate_grad_clip: Optional[float]):
        self.gates, self.topology, self.gate_grad_clip = gates, topology, gate_grad_clip

    def local_scales(self) -> dict[str, float]:
        """1 - silu(a) of each of this stage's layers, by global layer number. Each is computed as `scale` does,
        on the device, and all are read in one copy: on a GPU, one host sync per logged step, not one per layer."""
        if not self.gates:
            return {}
        scales = torch.stack([1.0 - F.silu(gate.gate.detach()) for gate in self.gates.values()]).tolist()
        return dict(zip(self.gates, scales))

    def metrics(self) -> dict:
        return {"gpas_scale": gather_over_stages(self.local_scales(), self.topology)}

    def separate_clip(self) -> Optional[tuple[set[torch.nn.Parameter], float]]:
        if not self.gate_grad_clip:
            return None
        return {gate.gate for gate in self.gates.values()}, self.gate_grad_clip
