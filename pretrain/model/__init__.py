"""The transformer: one readable file (gpt.py) plus its research modules (gpas.py)."""

from pretrain.model.gpt import GPT, padded_vocab_size

__all__ = ["GPT", "padded_vocab_size"]
