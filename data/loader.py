"""From the global sample stream to the micro-batches of each step, for one data-parallel rank.

Global batch g holds samples [g * G, (g + 1) * G) of the stream; data-parallel rank r
takes its contiguous slice, cut into micro-batches, so the union over ranks is the same
global batch whatever the data-parallel size. The position is the number of consumed
samples, saved in every checkpoint. A background thread prepares the next steps while
the current one trains.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import torch


class DataLoader:
    def __init__(
        self, stream: Sequence[np.ndarray], global_batch: int, micro_batch: int, *, dp_rank: int = 0,
        dp_size: int = 1, consumed_samples: int = 0, prefetch: int = 0, pin_memory: bool = False,
    ):
        """`pin_memory` (for a CUDA device): the micro-batches are made in page-locked memory, so that the
        trainer's `non_blocking` copy to the device is a true asynchronous DMA (a copy from pageable memory
        is staged by the driver, which may wait for the stream)."""
        if global_batch % (micro_batch * dp_size):
            raise ValueError("the global batch must be a multiple of micro-batch x data-parallel size")
        self.stream, self.global_batch, self.micro_batch = stream, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.pin_memory = dp_rank, dp_size, pin_memory
        self.consumed_samples = consumed_samples
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, args=(consumed_samples,), daemon=True)
            self._thread.start()

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def _read(self, consumed: int) -> list[torch.Tensor]:
        local = self.global_batch // self.dp_size
        start = consumed + self.dp_rank * local
        if start + local > len(self.stream):
            raise IndexError(f"the data stream ends at sample {len(self.stream)}: the run asked for more")
        tokens = torch.from_numpy(np.stack([self.stream[i] for i in range(start, start + local)]).astype(np.int64))
        if self.pin_memory:  # in the prefetch thread when there is one: off the training thread's path
            tokens = tokens.pin_memory()
        return list(tokens.split(self.micro_batch))

    def _produce(self, consumed: int) -> None:
        while not self._stop.is_set():
            try:
                item = self._read(consumed)
            except Exception as err:  # handed to the training thread, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            consumed += self.global_batch

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch, each [micro_batch, seq_length + 1] int64."""
        item = self._read(self.consumed_samples) if self._queue is None else self._take()
        if isinstance(item, Exception):
            raise item
        self.consumed_samples += self.global_batch
        return item

    def _take(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data loader's prefetch thread has stopped") from None

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=5.0)

    def __del__(self):
        self._stop.set()


def eval_batches(
    stream: Sequence[np.ndarray], global_batch: int, micro_batch: int, *, iters: int, dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The fixed validation batches: the first `iters` global batches of a validation stream."""
    loader = DataLoader(stream, global_batch, micro_batch, dp_rank=dp_rank, dp_size=dp_size)
    for _ in range(iters):
        yield from loader.next_step()
