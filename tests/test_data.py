import os
import struct

import numpy as np
import pytest

from data.indexed import (
    DatasetError, check_indexed_dataset, megatron_indexed, open_indexed_dataset, write_indexed_dataset,
)
from data.tokenizers import ByteTokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.decode(list(ids) + [tok.eod]) == text  # special tokens decode to nothing


def write(tmp_path, docs, name="d"):
    prefix = str(tmp_path / name)
    write_indexed_dataset(prefix, [np.asarray(d) for d in docs], np.uint16)
    return prefix


def test_written_dataset_reads_back_with_megatron_core(tmp_path):
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    prefix = write(tmp_path, docs)
    ds = megatron_indexed().IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.document_indices.tolist() == [0, 1, 2, 3]
    assert check_indexed_dataset(prefix) == (3, 4, np.uint16)
    assert not any(n.startswith("d.tmp") for n in os.listdir(tmp_path))  # temporary files renamed away


def test_missing_prefix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_indexed_dataset(str(tmp_path / "nothing"))


def test_wrong_magic(tmp_path):
    prefix = write(tmp_path, [[1, 2]])
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTANIDX")
    with pytest.raises(DatasetError, match="wrong magic"):
        open_indexed_dataset(prefix)


def test_wrong_version(tmp_path):
    prefix = write(tmp_path, [[1, 2]])
    with open(prefix + ".idx", "r+b") as f:
        f.seek(9)
        f.write(struct.pack("<Q", 7))
    with pytest.raises(DatasetError, match="version 7"):
        open_indexed_dataset(prefix)


def test_truncated_index(tmp_path):
    prefix = write(tmp_path, [[1, 2], [3, 4, 5]])
    size = os.path.getsize(prefix + ".idx")
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(size - 5)
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        open_indexed_dataset(prefix)


def test_truncated_bin(tmp_path):
    prefix = write(tmp_path, [[1, 2], [3, 4, 5]])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DatasetError, match="the .bin is truncated"):
        open_indexed_dataset(prefix)
