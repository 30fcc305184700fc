"""Tokenizers, indexed datasets, samples and the data loader; knows nothing of the trainer or the engine."""
