"""The samples of one indexed dataset (one prefix), epoch after epoch, through megatron-core's GPTDataset.

Each epoch is its own single-epoch GPTDataset seeded by (seed, epoch): its documents and
samples are shuffled within the epoch, so no document repeats before the epoch is done,
and sample k of the prefix (epoch k // samples_per_epoch) does not depend on how many
samples the run will read. megatron-core builds the index arrays of an epoch with its
compiled helpers, caches them as `.npy` files keyed by a hash of everything they depend
on, and memory-maps them. A sample is `seq_length + 1` tokens.
"""

from __future__ import annotations

import os
import warnings

import numpy as np


def fingerprint(prefix: str) -> str:
    """The prefix's absolute path and its files' sizes and times: part of the cache key, so that
    rewriting a dataset in place, or another dataset with the same relative path, never reuses old indices."""
    stats = [os.stat(prefix + suffix) for suffix in (".idx", ".bin")]
    return f"{os.path.abspath(prefix)}@" + ",".join(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)


def samples_per_epoch(tokens: int, seq_length: int) -> int:
    """Whole samples of `seq_length + 1` tokens (consecutive samples share one token) in `tokens`."""
    return max(0, (tokens - 1) // seq_length)


class PrefixSamples:
    def __init__(
        self, prefix: str, dataset, documents: np.ndarray, *, seq_length: int, seed: int, tokenizer,
        split: tuple[float, float], is_validation: bool, cache_dir: str | None,
    ):
        """`dataset`: the opened IndexedDataset of `prefix`; `documents`: the document indices of this split;
        `split`: the train/validation shares they came from (megatron-core keys its cache by the split string)."""
        self.prefix, self.dataset, self.documents = prefix, dataset, documents.astype(np.int32)
        self.seq_length, self.seed, self.tokenizer = seq_length, seed, tokenizer
        self.split, self.is_validation = split, is_validation
        self.cache = os.path.join(cache_dir or os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")
        self.key = fingerprint(prefix)
        tokens = int(dataset.sequence_lengths[self.documents].sum()) if len(self.documents) else 0
        self.samples_per_epoch = samples_per_epoch(tokens, seq_length)
        self._epochs: dict[int, object] = {}

    def epoch(self, epoch: int):
        """The single-epoch GPTDataset of `epoch`, built (or loaded from the cache) on first use."""
        if epoch not in self._epochs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
                from megatron.core.datasets.utils import Split
            config = GPTDatasetConfig(
                random_seed=(self.seed * 1_000_003 + epoch) % 2**31,
                sequence_length=self.seq_length,
                split=f"{self.split[0]:.6f},{self.split[1]:.6f},0",
                path_to_cache=self.cache,
                tokenizer=self.tokenizer,
                reset_position_ids=False,
                reset_attention_mask=False,
                eod_mask_loss=False,
                create_attention_mask=False,
            )
            self._epochs[epoch] = GPTDataset(
                self.dataset, self.key, self.documents, None, Split.valid if self.is_validation else Split.train, config
            )
        return self._epochs[epoch]

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, k = divmod(int(index), self.samples_per_epoch)
        # the raw `seq_length + 1` tokens; GPTDataset.__getitem__ would split them and rewrite pad ids
        tokens, _ = self.epoch(epoch)._query_document_sample_shuffle_indices(k)
        return tokens
