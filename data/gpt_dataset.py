"""The samples of one indexed dataset (one prefix), through megatron-core's GPTDataset.

megatron-core builds the three index arrays (document order over epochs, sample
boundaries, sample shuffle) with its compiled helpers, caches them as `.npy` files under
a name hashed from everything they depend on, and memory-maps them. Sample i is
`seq_length + 1` tokens cut from the shuffled documents, deterministic for the seed.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from data.indexed import DatasetError


class PrefixSamples:
    def __init__(
        self, prefix: str, dataset, documents: np.ndarray, num_samples: int, seq_length: int, seed: int, tokenizer,
        split: tuple[float, float], is_validation: bool, cache_dir: str | None,
    ):
        """`dataset`: the opened IndexedDataset of `prefix`; `documents`: the document indices of this split; `split`: the train/validation shares they came from
        (part of the cache key, since megatron-core keys its cache by the split string, not by the indices)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
            from megatron.core.datasets.utils import Split

        self.prefix = prefix
        self.tokens_per_epoch = int(dataset.sequence_lengths[documents].sum()) if len(documents) else 0
        self.samples_per_epoch = max(0, (self.tokens_per_epoch - 1) // seq_length)
        if self.samples_per_epoch == 0:
            kind = "validation" if is_validation else "training"
            raise DatasetError(
                f"{prefix}: its {kind} documents hold {self.tokens_per_epoch} tokens, too few for one sample of "
                f"model.seq_length+1={seq_length + 1} tokens: add data, shorten the sequence or change data.split"
            )
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            split=f"{split[0]:.6f},{split[1]:.6f},0",
            # next to the data, as Megatron-LM does, unless data.cache_dir says otherwise
            path_to_cache=os.path.join(cache_dir or os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices"),
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        self._dataset = GPTDataset(
            dataset, prefix, documents.astype(np.int32), num_samples,
            Split.valid if is_validation else Split.train, config,
        )

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        # the raw `seq_length + 1` tokens; GPTDataset.__getitem__ would split them and rewrite pad ids
        tokens, _ = self._dataset._query_document_sample_shuffle_indices(int(index))
        return tokens
