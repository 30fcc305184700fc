"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`), read and written with megatron-core.

megatron-core owns the format; this module adds what a training run needs around it:
checks that turn a missing, corrupt or truncated file into one clear error before
training starts, and atomic writes (temporary names, renamed when complete, the
`.idx` last, so a prefix whose `.idx` exists is always whole).

megatron-core is imported lazily: importing it costs seconds, and processes that never
touch a dataset (most multi-rank tests) should not pay for it.
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Iterable

import numpy as np

from parallel.errors import FoldtronError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# dtype codes of the .idx header, as megatron-core numbers them
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


class DatasetError(FoldtronError, ValueError):
    """A dataset that cannot be used; the message names the file and the problem."""


def megatron_indexed():
    """The megatron-core module that implements the format (imported on first use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that Apex and Transformer Engine are absent
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def megatron_helpers():
    """megatron-core's compiled index helpers (blending, sample indices), imported on first use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
    return helpers


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype that holds every token id (Megatron's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def check_indexed_dataset(prefix: str) -> tuple[int, int, type]:
    """Validate `prefix`.idx and `prefix`.bin without loading them; return (sequences, documents, dtype)."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DatasetError(f"dataset prefix {prefix!r}: {path} does not exist")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(len(MAGIC) + 8 + 1 + 8 + 8)
    if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
        raise DatasetError(f"{idx_path}: not a Megatron index (wrong magic bytes); rebuild the dataset")
    if len(header) < len(MAGIC) + 25:
        raise DatasetError(f"{idx_path}: truncated header ({idx_size} bytes); rebuild it")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != VERSION:
        raise DatasetError(f"{idx_path}: index version {version}, expected {VERSION}")
    code = header[17]
    if code not in DTYPES:
        raise DatasetError(f"{idx_path}: unknown dtype code {code}")
    sequences, documents = struct.unpack("<QQ", header[18:34])
    if sequences == 0:
        raise DatasetError(f"{idx_path}: the dataset holds no documents")
    expected = 34 + sequences * 4 + sequences * 8 + documents * 8
    if idx_size != expected:
        raise DatasetError(
            f"{idx_path}: {idx_size} bytes, but its header ({sequences} sequences, {documents} document boundaries) "
            f"needs {expected}: the file is truncated or corrupt; rebuild it"
        )
    dtype = DTYPES[code]
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=34, shape=(sequences,))
    needed = int(lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
    del lengths
    bin_size = os.path.getsize(bin_path)
    if bin_size < needed:
        raise DatasetError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} describes {needed}: the .bin is truncated; rebuild it"
        )
    return sequences, documents, dtype


def open_indexed_dataset(prefix: str, vocab_size: int | None = None):
    """Check `prefix` (and that its dtype holds `vocab_size` ids), then open it memory-mapped with megatron-core."""
    _, _, dtype = check_indexed_dataset(prefix)
    if vocab_size is not None and np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max < vocab_size - 1:
        raise DatasetError(
            f"{prefix}.idx stores tokens as {np.dtype(dtype).name}, which cannot hold the tokenizer's "
            f"{vocab_size} ids: it was made with another tokenizer; re-tokenize it or choose its tokenizer"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return megatron_indexed().IndexedDataset(prefix)


def write_indexed_dataset(prefix: str, documents: Iterable[np.ndarray], dtype: type) -> int:
    """Write one sequence per document with megatron-core's builder; return the number of tokens.

    Written under temporary names and renamed when complete, `.idx` last.
    """
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    mi = megatron_indexed()
    import torch

    builder = mi.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    tokens = 0
    try:
        for doc in documents:
            builder.add_item(torch.from_numpy(np.ascontiguousarray(doc)))  # the builder casts to `dtype`
            builder.end_document()
            tokens += len(doc)
        builder.finalize(tmp + ".idx")
    except BaseException:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return tokens
