"""GPAS: gradient-preserving activation scaling (arXiv 2506.22049).

Pre-LN residual streams grow layer after layer. GPAS shrinks the forward value by
`1 - silu(a)` while the gradient into the activations stays the identity:

    out = x - silu(a) * x.detach()

so d out / d x = 1 and d out / d a = -silu'(a) * x. The gate `a` starts at 0, where
silu(0) = 0: a fresh model is exactly the model without GPAS.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GPASGate(nn.Module):
    """One learnable scalar gate; a decoder layer applies it after each of its residual adds."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - F.silu(self.gate).to(x.dtype) * x.detach()

    def scale(self) -> float:
        """The forward scale 1 - silu(a), logged per layer."""
        return float(1.0 - F.silu(self.gate.detach()))
