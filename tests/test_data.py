import os
import struct

import numpy as np
import pytest

from data.indexed import DatasetError, check_indexed_dataset, megatron_indexed, open_indexed_dataset, write_indexed_dataset
from data.loader import DataLoader
from data.samples import DocumentPool, GPTSamples
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


def test_samples_cut_the_shuffled_document_stream(tmp_path):
    docs = [list(range(100 * d, 100 * d + n)) for d, n in enumerate([7, 3, 12, 5, 9])]
    pool = DocumentPool([write(tmp_path, docs)])
    samples = GPTSamples(pool, np.arange(5), seq_length=4, seed=3, name="train")
    assert samples.samples_per_epoch == (36 - 1) // 4
    order, starts, sample_order = samples._epoch(0)
    stream = np.concatenate([docs[d] for d in order])
    for i in range(samples.samples_per_epoch):
        j = sample_order[i]
        assert samples[i].tolist() == stream[j * 4 : j * 4 + 5].tolist()
    # the next epoch reshuffles and still covers the data
    assert samples[samples.samples_per_epoch].shape == (5,)
    again = GPTSamples(pool, np.arange(5), seq_length=4, seed=3, name="train")
    assert all(np.array_equal(samples[i], again[i]) for i in range(20))


def test_split_is_contiguous_and_disjoint(tmp_path):
    pool = DocumentPool([write(tmp_path, [[i, i] for i in range(50)])])
    train, valid = pool.split(0.9)
    assert train.tolist() == list(range(45)) and valid.tolist() == list(range(45, 50))


def test_too_little_data_is_a_clear_error(tmp_path):
    pool = DocumentPool([write(tmp_path, [[1, 2, 3]])])
    with pytest.raises(DatasetError, match="too few for one sample"):
        GPTSamples(pool, np.arange(1), seq_length=8, seed=0, name="train")


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_loader_union_over_data_parallel_ranks_is_the_global_batch(tiny_corpus, dp_size):
    pool = DocumentPool([tiny_corpus])
    samples = GPTSamples(pool, np.arange(len(pool)), seq_length=16, seed=0, name="train")
    reference = DataLoader(samples, 8, 1)
    loaders = [DataLoader(samples, 8, 8 // (2 * dp_size) or 1, r, dp_size) for r in range(dp_size)]
    for _ in range(3):
        expected = np.concatenate([t.numpy() for t in reference.next_step()])
        got = np.concatenate([t.numpy() for loader in loaders for t in loader.next_step()])
        assert np.array_equal(expected, got)


def test_loader_resumes_at_consumed_samples(tiny_corpus):
    pool = DocumentPool([tiny_corpus])
    samples = GPTSamples(pool, np.arange(len(pool)), seq_length=16, seed=0, name="train")
    a = DataLoader(samples, 4, 2)
    for _ in range(3):
        a.next_step()
    b = DataLoader(samples, 4, 2, consumed_samples=a.consumed_samples)
    assert all(np.array_equal(x, y) for x, y in zip(a.next_step(), b.next_step()))
