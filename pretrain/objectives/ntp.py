"""Next-token prediction: mean cross-entropy of every position's logits against the following token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, vocab], labels [batch, seq] -> mean loss over all tokens, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
