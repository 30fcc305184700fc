"""Next-token prediction: mean cross-entropy of every position's logits against the following token."""

from __future__ import annotations

import torch

from parallel.tensor_parallel import vocab_parallel_cross_entropy
from parallel.topology import Topology


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, topology: Topology) -> torch.Tensor:
    """logits [batch, seq, vocab / TP] (this rank's vocabulary slice), labels [batch, seq] -> mean loss over
    this rank's tokens, in fp32. Full-vocabulary logits are never gathered."""
    return vocab_parallel_cross_entropy(logits, labels, topology).mean()
