"""data.synthetic: random token ids that behave like a real stream (resumable, layout-independent), with no files."""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from data.loader import DataLoader
from data.synthetic import SyntheticPlan, SyntheticStreams
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError
from pretrain.trainer import Trainer, load_tokenizer, plan_data, train

SEQ = 16


def streams(seed=7, *, steps=10, global_batch=8, vocab_size=258, eval_samples=0):
    plan = SyntheticPlan(total_steps=steps, global_batch=global_batch, seq_length=SEQ, vocab_size=vocab_size)
    return SyntheticStreams(plan, seed=seed, eval_samples=eval_samples)


def test_sample_i_is_a_pure_function_of_the_seed_and_i():
    a, b = streams(), streams()
    order = [5, 0, 79, 5, 33]  # read in any order, repeats included: no generator state is shared between samples
    first = {i: a[i] for i in order}
    assert all(np.array_equal(first[i], b[i]) for i in reversed(order))
    assert np.array_equal(a[5], streams()[5]) and not np.array_equal(a[5], a[6])
    assert not np.array_equal(a[5], streams(seed=8)[5])
    assert len(a) == 80 and a[0].shape == (SEQ + 1,) and a[0].dtype == np.int64
    with pytest.raises(IndexError):
        a[80]


def test_ids_are_within_the_tokenizer_vocabulary_and_cover_it():
    ids = np.concatenate([streams(vocab_size=50)[i] for i in range(80)])
    assert ids.min() == 0 and ids.max() == 49 and len(np.unique(ids)) == 50


def test_validation_samples_differ_from_the_training_samples():
    s = streams(eval_samples=8)
    (validation,) = s.validation
    assert len(validation) == 8 and validation.name == "synthetic"
    assert not any(np.array_equal(validation[i], s[i]) for i in range(8))
    assert streams().validation == []


@pytest.mark.parametrize("dp_size", [2, 4])
def test_data_parallel_ranks_together_read_the_same_global_batches(dp_size):
    s = streams()
    single = DataLoader(s, 8, 2)
    ranks = [DataLoader(s, 8, 8 // dp_size // 2, dp_rank=r, dp_size=dp_size, prefetch=2) for r in range(dp_size)]
    for _ in range(10):
        expected = np.concatenate([t.numpy() for t in single.next_step()])
        got = np.concatenate([t.numpy() for loader in ranks for t in loader.next_step()])
        assert np.array_equal(expected, got)
    for loader in ranks:
        loader.close()


def test_resuming_continues_with_the_same_samples():
    full = DataLoader(streams(), 8, 4)
    steps = [full.next_step() for _ in range(10)]
    resumed = DataLoader(streams(), 8, 4, consumed_samples=6 * 8, prefetch=2)
    for step in range(6, 10):
        assert all(np.array_equal(x, y) for x, y in zip(steps[step], resumed.next_step()))
    resumed.close()


def test_the_schedule_counts_one_source_in_one_phase():
    s = streams()
    assert s.schedule.counts(8, 24).tolist() == [16] and s.schedule.counts(72, 100).tolist() == [8]
    assert s.schedule.phase_names == ["all"] and s.schedule.phase_of(79) == 0
    report = s.plan.report()
    assert "random token ids in [0, 258)" in report and "synthetic" in report and "1,280" in report  # 80 x 16 tokens


@pytest.mark.parametrize("override, field", [
    ("data.phases=[{weights: {stdlib: 1}}]", "data.phases"),
    ("data.validation={held: [embedded:docs]}", "data.validation"),
])
def test_a_schedule_or_files_with_synthetic_data_are_refused(tmp_path, tiny_corpus, override, field):
    cfg = tiny_config(tmp_path, tiny_corpus, "data.synthetic=true", override)
    with pytest.raises(ConfigError, match=f"{field} is set but data.synthetic=true reads no data"):
        cfg.validate()


def test_sources_are_not_opened(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "data.synthetic=true", "data.sources={gone: {prefixes: [/no/such]}}")
    plan = plan_data(cfg.validate(), load_tokenizer(cfg))
    assert isinstance(plan, SyntheticPlan) and len(plan.schedule) == 6 * 4


def test_a_run_on_synthetic_data_trains_evaluates_and_resumes(tmp_path, tiny_corpus, capsys):
    cfg = tiny_config(tmp_path, tiny_corpus, "data.synthetic=true", "train.stop_at_step=3")
    train(cfg)
    out = capsys.readouterr().out
    assert "data: 1 source(s) in 1 phase(s), 1 validation set(s)" in out and "(data.synthetic)" in out
    rest = tiny_config(tmp_path, tiny_corpus, "data.synthetic=true")
    trainer = Trainer(rest)
    assert trainer.step == 3 and trainer.loader.consumed_samples == 12
    trainer.run()
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["tokens_by_source"] == {"synthetic": 6 * 4 * 16} and "val_loss" in records[2]
    assert abs(records[0]["loss"] - np.log(320)) < 0.5  # random ids: about log(vocabulary) (258 padded to 320)
    with pytest.raises(CheckpointError, match="other data settings"):  # real data would read another stream
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=8"))
