"""GPT training samples: `seq_length + 1` tokens cut from the concatenated, shuffled documents.

Sample i of a split is a pure function of (documents, seq_length, seed, i): epoch
e = i // samples_per_epoch shuffles the documents and the samples of that epoch with a
generator seeded by (seed, e). Consecutive samples share one boundary token (the last
label of one is the first input of the next), as in Megatron-LM.
"""

from __future__ import annotations

import numpy as np

from data.indexed import DatasetError, open_indexed_dataset


class DocumentPool:
    """The documents of one or more indexed datasets, addressed by one flat index."""

    def __init__(self, prefixes: list[str]):
        self.prefixes = list(prefixes)
        self.datasets = [open_indexed_dataset(p) for p in self.prefixes]
        self.lengths = np.concatenate([np.asarray(d.sequence_lengths, dtype=np.int64) for d in self.datasets])
        self.owner = np.concatenate([np.full(len(d), k, dtype=np.int64) for k, d in enumerate(self.datasets)])
        self.first = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        k = int(self.owner[doc])
        return self.datasets[k].get(int(doc - self.first[k]), offset=offset, length=length)

    def split(self, train_share: float) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous train and validation document ranges of each dataset (seed-independent, like Megatron)."""
        train, valid = [], []
        for k, d in enumerate(self.datasets):
            cut = int(round(len(d) * train_share))
            ids = np.arange(self.first[k], self.first[k + 1])
            train.append(ids[:cut])
            valid.append(ids[cut:])
        return np.concatenate(train), np.concatenate(valid)


class GPTSamples:
    def __init__(self, pool: DocumentPool, documents: np.ndarray, seq_length: int, seed: int, name: str):
        self.pool, self.documents, self.seq_length, self.seed = pool, documents, seq_length, seed
        tokens = int(pool.lengths[documents].sum())
        self.samples_per_epoch = max(0, (tokens - 1) // seq_length)
        if self.samples_per_epoch == 0:
            raise DatasetError(
                f"the {name} split has {tokens} tokens, too few for one sample of model.seq_length+1="
                f"{seq_length + 1}: use more data, a shorter sequence or a different data.split"
            )
        self.tokens_per_epoch = tokens
        self._cached_epoch: tuple[int, tuple] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order, their start offsets in the stream, and the sample order of `epoch` (last one cached)."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = self.documents[rng.permutation(len(self.documents))]
            starts = np.concatenate([[0], np.cumsum(self.pool.lengths[order])])
            self._cached_epoch = (epoch, (order, starts, rng.permutation(self.samples_per_epoch)))
        return self._cached_epoch[1]

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, j = divmod(int(index), self.samples_per_epoch)
        order, starts, sample_order = self._epoch(epoch)
        begin = int(sample_order[j]) * self.seq_length
        end = begin + self.seq_length + 1
        pieces = []
        k = int(np.searchsorted(starts, begin, side="right")) - 1
        while begin < end:
            doc_end = int(starts[k + 1])
            take = min(end, doc_end) - begin
            pieces.append(self.pool.read(int(order[k]), begin - int(starts[k]), take))
            begin += take
            k += 1
        return np.concatenate(pieces).astype(np.int64)

    def batch(self, start: int, count: int) -> np.ndarray:
        return np.stack([self[i] for i in range(start, start + count)])
