"""The synthetic RLP corpora `embedded:digits` and `embedded:digits-think` (data/thinking.py)."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from data import thinking
from data.blend import SourceConfig
from data.embedded import CORPORA, embedded_prefix
from data.indexed import open_indexed_dataset
from data.sources import TrainingStreams, make_plan
from data.tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("thinking-cache"))


@pytest.fixture(scope="module")
def built(cache) -> dict[str, list[np.ndarray]]:
    """Both corpora, built into the cache as a config's `embedded:` prefixes are, and read back."""
    out = {}
    for name in ("digits", "digits-think"):
        prefix = embedded_prefix(name, cache)
        dataset = open_indexed_dataset(prefix, TOKENIZER.vocab_size)
        lengths = np.array(dataset.sequence_lengths)  # a copy: the index's memory map closes with `dataset`
        tokens = np.fromfile(prefix + ".bin", dtype=np.uint16).astype(np.int64)
        out[name] = np.split(tokens, np.cumsum(lengths)[:-1])
    return out


def without_thoughts(doc: np.ndarray) -> np.ndarray:
    depth = np.cumsum(doc == thinking.THINK) - np.cumsum(doc == thinking.END_THINK)  # 1 from <think> to before </think>
    return doc[(depth == 0) & (doc != thinking.END_THINK)]


def test_a_problem_reads_as_the_docstring_says():
    doc = thinking.render([(7, "+*~")], think=True)
    assert TOKENIZER.decode(doc) == "7+*~=<think>7846</think>6\n"
    assert TOKENIZER.decode(thinking.render([(7, "+*~")], think=False)) == "7+*~=6\n"
    assert doc[-1] == TOKENIZER.eod and thinking.values(7, "+*~") == [7, 8, 4, 6]
    (problem,) = thinking.problems(doc)
    assert (problem.start, problem.operations, problem.answer, problem.position) == (7, "+*~", 6, 11)
    assert TOKENIZER.decode(problem.thought) == "7846"
    # every operation permutes the ten digits, and none leaves them all in place
    for symbol, op in thinking.OPERATIONS.items():
        assert {op(d) for d in range(10)} == set(range(10)) and any(op(d) != d for d in range(10)), symbol
    assert thinking.values(3, "-/~") == [3, 2, 4, 6]  # 3-1=2, 2*7=14 -> 4, -4 -> 6


def test_the_corpora_are_deterministic_and_built_once(built, cache, tmp_path):
    for name, think in (("digits", False), ("digits-think", True)):
        assert CORPORA[name].version == thinking.VERSION
        assert embedded_prefix(name, cache).endswith(f"{name}-{thinking.VERSION}-byte")
        assert len(built[name]) == thinking.DOCUMENTS
        for i in range(0, thinking.DOCUMENTS, 97):  # document i is a function of (SEED, i) alone
            problems, thinks = thinking.draw(i)
            assert np.array_equal(thinking.render(problems, think and thinks), built[name][i])
    assert np.array_equal(next(thinking.documents(think=True, count=1)), built["digits-think"][0])
    other = embedded_prefix("digits-think", str(tmp_path))
    for suffix in (".bin", ".idx"):
        with open(other + suffix, "rb") as a, open(embedded_prefix("digits-think", cache) + suffix, "rb") as b:
            assert a.read() == b.read()


def test_the_version_names_this_content(cache):
    """Version v1 is these bytes. If this fails, the documents changed (an edit of data/thinking.py, or a numpy
    whose generator streams differ): bump thinking.VERSION, so that no cache built before is reused, and update
    the digests."""
    digests = {name: hashlib.sha256(Path(embedded_prefix(name, cache) + ".bin").read_bytes()).hexdigest()[:16]
               for name in ("digits", "digits-think")}
    assert thinking.VERSION == "v1"
    assert digests == {"digits": "a4f80b805f65a626", "digits-think": "e599f3a792518bb1"}


def test_answers_are_the_results_of_the_key_sequences(built):
    for name in ("digits", "digits-think"):
        for doc in built[name][:2000]:
            problems = thinking.problems(doc)
            assert thinking.PROBLEMS[0] <= len(problems) <= thinking.PROBLEMS[1]
            assert doc[-1] == TOKENIZER.eod and TOKENIZER.eod not in doc[:-1]
            for p in problems:
                # recomputed from the ids, not from the generator's draw
                eq = int(np.flatnonzero(doc[:p.position] == thinking.EQUALS)[-1])
                first = eq - thinking.STEPS - 1
                start, symbols = int(doc[first]) - thinking.ZERO, "".join(chr(i) for i in doc[first + 1:eq])
                assert 0 <= start <= 9 and all(s in thinking.OPERATIONS for s in symbols)
                value = start
                for s in symbols:
                    value = thinking.OPERATIONS[s](value)
                assert doc[p.position] == thinking.ZERO + value == thinking.ZERO + p.answer
                assert doc[p.position + 1] == thinking.NEWLINE


def test_thoughts_only_in_the_think_corpus_delimited_before_each_answer(built):
    plain, think = built["digits"], built["digits-think"]
    assert not any(np.isin(doc, TOKENIZER.think_ids).any() for doc in plain)
    thinking_docs = 0
    for i, (doc, same) in enumerate(zip(think, plain)):
        assert np.array_equal(without_thoughts(doc), same)  # the same documents, thoughts left out
        opens, closes = np.flatnonzero(doc == thinking.THINK), np.flatnonzero(doc == thinking.END_THINK)
        thinking_docs += bool(len(opens))
        if not len(opens):
            assert not len(closes)
        elif i < 4000:  # the placement of each thought, on the first documents
            problems = thinking.problems(doc)
            assert len(opens) == len(closes) == len(problems)  # every problem of a thinking document has one
            for o, c, p in zip(opens, closes, problems):
                assert doc[o - 1] == thinking.EQUALS and c == p.position - 1  # right after `=`, right before the answer
                assert tuple(doc[o + 1:c]) == p.thought and len(p.thought) == thinking.STEPS + 1
                assert doc[c - 1] == doc[p.position]  # the answer repeats the thought's last value
    share = thinking_docs / len(think)
    sigma = math.sqrt(thinking.THINK_SHARE * (1 - thinking.THINK_SHARE) / len(think))
    assert abs(share - thinking.THINK_SHARE) < 4 * sigma and 0.3 <= share <= 0.5


def test_a_seventh_of_the_plain_positions_are_answers(built):
    tokens = sum(len(doc) for doc in built["digits"])
    answers = sum(int((doc == thinking.EQUALS).sum()) for doc in built["digits"])  # one answer after each `=`
    assert answers / tokens == pytest.approx(1 / 7, abs=0.003)  # 7 ids per problem, plus one eod per document


def test_think_ids_fit_the_dataset_and_the_padded_vocabulary(built, cache):
    dataset = open_indexed_dataset(embedded_prefix("digits-think", cache), TOKENIZER.vocab_size)
    assert dataset[0].dtype == np.uint16
    assert max(int(doc.max()) for doc in built["digits-think"]) == thinking.END_THINK == 259
    assert TOKENIZER.vocab_size <= thinking.THINK < thinking.END_THINK < 384  # model.vocab_multiple=128 pads to 384
    assert "<think>" in TOKENIZER.decode(built["digits-think"][next(
        i for i, d in enumerate(built["digits-think"]) if thinking.THINK in d)])


def test_the_split_holds_out_the_same_documents_of_both(cache, built):
    plans = {name: make_plan({name: SourceConfig(prefixes=[f"embedded:{name}"])}, [], validation={},
                             split=(0.98, 0.02), total_steps=10, global_batch=4, seq_length=64, vocab_size=258,
                             cache_dir=cache)
             for name in ("digits", "digits-think")}
    held = {name: plan.sources[0].prefixes[0].valid_docs for name, plan in plans.items()}
    assert np.array_equal(held["digits"], held["digits-think"])
    assert len(held["digits"]) == thinking.DOCUMENTS // 50 and held["digits"][0] == thinking.DOCUMENTS * 49 // 50
    for name, plan in plans.items():
        streams = TrainingStreams(plan, seed=1, tokenizer=TOKENIZER, eval_samples=16, cache_dir=cache)
        streams.build_indices()
        samples = np.stack([streams.validation[0][k] for k in range(16)] + [streams[k] for k in range(16)])
        assert samples.shape == (32, 65) and np.isin(samples, TOKENIZER.think_ids).any() == (name == "digits-think")


def test_a_trainer_reads_it_through_data_sources(tmp_path, cache):
    from pretrain.trainer import Trainer

    cfg = tiny_config(tmp_path, "unused", "data.sources={rlp: {prefixes: [embedded:digits-think]}}",
                      f"data.cache_dir={cache}", "model.seq_length=64", "eval.interval=0")
    trainer = Trainer(cfg)
    assert trainer.vocab_size > thinking.END_THINK
    batch = np.concatenate([trainer.data[i] for i in range(8)])
    assert np.isin(batch, TOKENIZER.think_ids).any()
    loss, _ = trainer.train_step()
    assert math.isfinite(loss)
