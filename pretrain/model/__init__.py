"""The transformer: one readable file (gpt.py), its MoE block (moe.py, router.py), its research
modules (gpas.py) and the small interface the training loop drives them through (features.py)."""

from pretrain.model.gpt import GPT, model_signature, padded_vocab_size

__all__ = ["GPT", "model_signature", "padded_vocab_size"]
