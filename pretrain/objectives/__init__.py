"""Training objectives: what the last stage turns logits into (a scalar loss and its statistics)."""

from pretrain.objectives.ntp import next_token_loss

__all__ = ["next_token_loss"]
