"""Next-token prediction: mean cross-entropy of every position's logits against the following token."""

from __future__ import annotations

import torch


def next_token_loss(token_losses: torch.Tensor) -> torch.Tensor:
    """The per-token losses [batch, seq] (fp32) that the model returns given the labels (its output layer fused
    with the vocabulary-parallel cross-entropy, so that the logits are never held) -> their mean over this rank's
    tokens. Full-vocabulary logits are never gathered."""
    return token_losses.mean()
