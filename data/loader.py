"""From samples to the micro-batches of each step, for one data-parallel rank.

Global batch g holds samples [g * G, (g + 1) * G) of the training stream; data-parallel
rank r takes its contiguous slice, cut into micro-batches. The position is the number
of consumed samples, so a resumed run continues with exactly the next samples.
"""

from __future__ import annotations

import torch

from data.embedded import embedded_corpus
from data.samples import DocumentPool, GPTSamples


def build_splits(
    prefixes: list[str], train_share: float, seq_length: int, seed: int, cache_dir: str | None
) -> tuple[GPTSamples, GPTSamples | None]:
    """Train and validation samples of `prefixes` (none given: the embedded corpus)."""
    pool = DocumentPool(prefixes or [embedded_corpus(cache_dir)])
    train_docs, valid_docs = pool.split(train_share)
    train = GPTSamples(pool, train_docs, seq_length, seed, "train")
    valid = GPTSamples(pool, valid_docs, seq_length, seed, "validation") if len(valid_docs) else None
    return train, valid


class DataLoader:
    def __init__(
        self, samples: GPTSamples, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
        consumed_samples: int = 0,
    ):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("the global batch must be a multiple of micro-batch x data-parallel size")
        self.samples, self.global_batch, self.micro_batch = samples, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch, each [micro_batch, seq_length + 1] int64."""
        local = self.global_batch // self.dp_size
        start = self.consumed_samples + self.dp_rank * local
        tokens = torch.from_numpy(self.samples.batch(start, local))
        self.consumed_samples += self.global_batch
        return list(tokens.split(self.micro_batch))


def eval_batches(samples: GPTSamples, global_batch: int, micro_batch: int, iters: int, dp_rank: int = 0, dp_size: int = 1):
    """The fixed validation batches: the first `iters` global batches of the validation stream."""
    loader = DataLoader(samples, global_batch, micro_batch, dp_rank, dp_size)
    for _ in range(iters):
        yield from loader.next_step()


__all__ = ["DataLoader", "build_splits", "eval_batches"]
