"""Blends and phase schedules: exact mixtures, continuous sources, resumable and layout-independent streams."""

import numpy as np
import pytest

from data.blend import BlendSchedule, PhaseConfig, SourceConfig, greedy_blend, phase_boundaries
from data.indexed import DatasetError, write_indexed_dataset
from data.loader import DataLoader
from data.sources import TrainingStreams, make_plan
from data.tokenizers import ByteTokenizer

RANGES = {"a": (1, 50), "b": (50, 100), "c": (100, 150)}  # each source its own token ids: a sample names its source


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    out = {}
    for name, (lo, hi) in RANGES.items():
        docs = [rng.integers(lo, hi, size=rng.integers(5, 40)) for _ in range(150)]
        prefix = str(root / name)
        write_indexed_dataset(prefix, docs, np.uint16)
        out[name] = SourceConfig(prefixes=[prefix])
    return out


PHASES = [
    PhaseConfig(name="broad", fraction=0.5, weights={"a": 2, "b": 1, "c": 1}),
    PhaseConfig(name="focus", weights={"b": 1, "c": 3}),
]


def plan_for(sources, phases=PHASES, *, validation=None, split=(0.9, 0.1), steps=30, global_batch=8, vocab_size=258,
             **kw):
    """make_plan with this file's defaults (no separate validation sets, samples of 8 + 1 tokens)."""
    return make_plan(sources, phases, validation=validation or {}, split=split, total_steps=steps,
                     global_batch=global_batch, seq_length=8, vocab_size=vocab_size, **kw)


def source_of(sample: np.ndarray) -> str:
    return next(n for n, (lo, hi) in RANGES.items() if lo <= sample[0] < hi)


def test_greedy_blend_is_exact_at_every_prefix():
    weights = np.array([0.5, 0.0, 0.3, 0.2])
    which, counter = greedy_blend(weights, 5000)
    drawn = np.stack([np.cumsum(which == k) for k in range(4)], axis=1)
    expected = weights[None] * np.arange(1, 5001)[:, None]
    assert np.abs(drawn - expected).max() < 1.0
    assert drawn[:, 1].max() == 0  # a zero-weight entry is never drawn
    for k in range(4):  # each entry's counter runs 0, 1, 2, ... in draw order
        assert counter[which == k].tolist() == list(range(int((which == k).sum())))


def test_phases_split_the_run_and_sources_continue_across_them():
    schedule = BlendSchedule(["a", "b", "c"], ["p1", "p2"], np.array([[2, 1, 1], [0, 1, 3]]), phase_ends=[15, 30],
                             global_batch=8)
    assert schedule.phase_of(15 * 8 - 1) == 0 and schedule.phase_of(15 * 8) == 1
    for s in range(3):  # one continuous stream per source: indices 0..n-1, in order, across phases
        assert schedule.index[schedule.source == s].tolist() == list(range(int((schedule.source == s).sum())))
    counts = schedule.phase_counts()
    assert counts.tolist() == [[60, 30, 30], [0, 30, 90]]


@pytest.mark.parametrize(
    "phases, message",
    [
        ([PhaseConfig(fraction=0.7), PhaseConfig(fraction=0.5)], "add up to 1.2 of the run"),
        ([PhaseConfig(fraction=0.3), PhaseConfig(fraction=0.3)], "cover 18 of train.iters=30"),
        ([PhaseConfig(), PhaseConfig()], "only the last phase may take the rest"),
        ([PhaseConfig(tokens=10, fraction=0.5)], "not both"),
    ],
)
def test_phase_lengths_that_do_not_fit(phases, message):
    with pytest.raises(ValueError, match=message):
        phase_boundaries(phases, 30, 64)


def test_phase_lengths_in_tokens_round_to_steps():
    assert phase_boundaries([PhaseConfig(tokens=64 * 10), PhaseConfig()], 30, 64) == [10, 30]


def test_inexact_phase_fractions_round_to_the_nearest_step(sources):
    """Fractions are not exact in binary: 0.29 * 100 = 28.999999999999996, and 0.7 + 0.2 + 0.1 of 10 steps is
    9.999999999999998. A phase ends at the step nearest to its share of the run (29; 7, 9, 10), not at the
    step below it (28; 7, 9, 9, which would leave the last step out of every phase)."""
    assert 0.29 * 100 < 29 and (0.7 + 0.2 + 0.1) * 10 < 10  # the premise: these products fall short of the step
    assert phase_boundaries([PhaseConfig(fraction=0.29), PhaseConfig()], 100, 64) == [29, 100]
    assert phase_boundaries([PhaseConfig(fraction=f) for f in (0.7, 0.2, 0.1)], 10, 64) == [7, 9, 10]
    # the plan the loader draws from: 29 steps of 8 samples in the first phase, the 71 others in the second
    phases = [PhaseConfig(fraction=0.29, weights={"a": 1}), PhaseConfig(weights={"b": 1})]
    assert plan_for(sources, phases, steps=100).schedule.phase_counts().tolist() == [[29 * 8, 0, 0], [0, 71 * 8, 0]]


def test_loader_draws_exactly_what_the_plan_reports(sources):
    plan = plan_for(sources)
    streams = TrainingStreams(plan, seed=7, tokenizer=ByteTokenizer(), eval_samples=0)
    loader = DataLoader(streams, 8, 4, prefetch=2)
    drawn = np.zeros((2, 3), dtype=np.int64)
    names = list(RANGES)
    for step in range(30):
        phase = 0 if step < 15 else 1
        for batch in loader.next_step():
            for sample in batch.numpy():
                drawn[phase, names.index(source_of(sample))] += 1
                assert source_of(sample) == source_of(sample[::-1])  # one source per sample, never mixed
    loader.close()
    assert drawn.tolist() == plan.schedule.phase_counts().tolist() == [[60, 30, 30], [0, 30, 90]]
    report = plan.report()
    assert "broad            a                        60" in report
    assert "focus            c                        90" in report


@pytest.mark.parametrize("start", [0, 5, 15, 22])  # 15 and 22: inside the second phase
def test_resume_at_any_step_continues_with_the_same_samples(sources, start):
    full = DataLoader(TrainingStreams(plan_for(sources), seed=7, tokenizer=ByteTokenizer(), eval_samples=0), 8, 2)
    steps = [full.next_step() for _ in range(30)]
    resumed = DataLoader(TrainingStreams(plan_for(sources), seed=7, tokenizer=ByteTokenizer(), eval_samples=0), 8, 2,
                         consumed_samples=start * 8, prefetch=3)
    for step in range(start, 30):
        assert all(np.array_equal(x, y) for x, y in zip(steps[step], resumed.next_step()))
    resumed.close()


@pytest.mark.parametrize("dp_size", [2, 4])
def test_data_parallel_ranks_together_read_the_same_global_batches(sources, dp_size):
    streams = TrainingStreams(plan_for(sources), seed=7, tokenizer=ByteTokenizer(), eval_samples=0)
    single = DataLoader(streams, 8, 1)
    ranks = [DataLoader(streams, 8, 8 // dp_size // 2, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for _ in range(30):
        expected = np.concatenate([t.numpy() for t in single.next_step()])
        got = np.concatenate([t.numpy() for loader in ranks for t in loader.next_step()])
        assert np.array_equal(expected, got)


def test_max_epochs_is_enforced_before_training(sources):
    limited = dict(sources, c=SourceConfig(prefixes=sources["c"].prefixes, max_epochs=0.1))
    with pytest.raises(DatasetError,
                       match=r"data.sources.c: the schedule reads it .* times, more than its max_epochs=0.1"):
        plan_for(limited)
    plan_for(dict(sources, c=SourceConfig(prefixes=sources["c"].prefixes, max_epochs=5)))


def test_missing_prefix_names_the_source(sources, tmp_path):
    broken = dict(sources, b=SourceConfig(prefixes=[str(tmp_path / "gone")]))
    with pytest.raises(DatasetError, match="data.sources.b: dataset prefix .*gone.* does not exist"):
        plan_for(broken)


def test_dtype_that_cannot_hold_the_vocabulary(tmp_path):
    prefix = str(tmp_path / "bytes8")
    write_indexed_dataset(prefix, [np.arange(100)], np.uint8)
    with pytest.raises(DatasetError, match="uint8, which cannot hold the tokenizer's 258 ids"):
        plan_for({"x": SourceConfig(prefixes=[prefix])}, [], split=(1.0, 0.0), steps=1, global_batch=1)


def test_validation_sets_are_held_out_documents_or_separate_sources(sources):
    plan = plan_for(sources)
    assert [s.name for s in plan.validation] == ["a", "b", "c"]
    for source in plan.sources:
        for p in source.prefixes:
            assert len(p.train_docs) == 135 and p.valid_docs.tolist() == list(range(135, 150))
    separate = plan_for(sources, PHASES, validation={"held": sources["a"].prefixes})
    assert [s.name for s in separate.validation] == ["held"]
    assert all(len(p.train_docs) == 150 for s in separate.sources for p in s.prefixes)
    streams = TrainingStreams(separate, seed=7, tokenizer=ByteTokenizer(), eval_samples=16)
    assert len(streams.validation[0]) == 16 and source_of(streams.validation[0][3]) == "a"


def test_within_source_weights_blend_prefixes(sources):
    mixed = {"ab": SourceConfig(prefixes=sources["a"].prefixes + sources["b"].prefixes, weights=[3, 1])}
    plan = plan_for(mixed, [], steps=10)
    streams = TrainingStreams(plan, seed=7, tokenizer=ByteTokenizer(), eval_samples=0)
    picks = [source_of(streams[i]) for i in range(80)]
    assert picks.count("a") == 60 and picks.count("b") == 20


def test_empty_documents_are_skipped_by_the_samples(tmp_path):
    prefix = str(tmp_path / "gaps")
    docs = [np.arange(1, 20), np.zeros(0, dtype=np.int64), np.arange(20, 31), np.zeros(0, dtype=np.int64)] * 10
    write_indexed_dataset(prefix, docs, np.uint16)
    plan = plan_for({"g": SourceConfig(prefixes=[prefix])}, [], split=(1.0, 0.0), steps=5, global_batch=4)
    streams = TrainingStreams(plan, seed=1, tokenizer=ByteTokenizer(), eval_samples=0)
    samples = [streams[i] for i in range(len(streams))]
    assert all(len(s) == 9 for s in samples)
    assert all(1 <= t < 31 for s in samples for t in s)


def unique_token_source(tmp_path, name, lengths):
    """A dataset whose every token is distinct (token = its position in the file), so samples show overlaps."""
    prefix = str(tmp_path / name)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    write_indexed_dataset(prefix, [np.arange(a, b) + 1 for a, b in zip(starts[:-1], starts[1:])], np.int32)
    return prefix


def test_no_document_repeats_before_its_epoch_is_done(tmp_path):
    prefix = unique_token_source(tmp_path, "u", [13, 7, 29, 5, 17, 11] * 5)
    plan = plan_for({"u": SourceConfig(prefixes=[prefix])}, [], split=(1.0, 0.0), steps=16, vocab_size=100_000)
    streams = TrainingStreams(plan, seed=3, tokenizer=ByteTokenizer(), eval_samples=0)
    per_epoch = streams.train[0].prefixes[0].samples_per_epoch
    assert per_epoch == len(streams.train[0].prefixes[0].epoch(0)) == (sum([13, 7, 29, 5, 17, 11] * 5) - 1) // 8
    assert len(streams) > 2 * per_epoch  # the run reads the source more than twice
    for epoch in range(2):
        seen = np.concatenate([streams[i][:-1] for i in range(epoch * per_epoch, (epoch + 1) * per_epoch)])
        assert len(np.unique(seen)) == len(seen)  # every token at most once inside an epoch
    assert plan.source_epochs(np.array([per_epoch]))[0] == 1.0
    assert plan.source_epochs(np.array([per_epoch + 1]))[0] > 1.0


def test_rewriting_a_dataset_in_place_never_reuses_stale_indices(tmp_path):
    prefix = unique_token_source(tmp_path, "w", [9] * 40)
    settings = dict(split=(1.0, 0.0), steps=2, global_batch=4, vocab_size=100_000)
    first = TrainingStreams(plan_for({"w": SourceConfig(prefixes=[prefix])}, [], **settings), seed=1,
                            tokenizer=ByteTokenizer(), eval_samples=0)
    assert first[0].max() <= 360
    unique_token_source(tmp_path, "w", [33] * 40)  # same prefix, other content
    again = TrainingStreams(plan_for({"w": SourceConfig(prefixes=[prefix])}, [], **settings), seed=1,
                            tokenizer=ByteTokenizer(), eval_samples=0)
    assert len(again[0]) == 9 and again.train[0].prefixes[0].samples_per_epoch == (33 * 40 - 1) // 8


def test_small_prefixes_without_held_out_samples(tmp_path, sources):
    tiny = unique_token_source(tmp_path, "tiny", [5, 5])
    mixed = {"m": SourceConfig(prefixes=sources["a"].prefixes + [tiny])}
    plan = plan_for(mixed, [], split=(0.5, 0.5), steps=4, global_batch=4)  # tiny: 5 training tokens, no whole sample
    assert plan.sources[0].weights[1] == 0 and plan.validation[0].weights[1] == 0
    TrainingStreams(plan, seed=1, tokenizer=ByteTokenizer(), eval_samples=8)[0]
    weighted = {"m": SourceConfig(prefixes=sources["a"].prefixes + [tiny], weights=[1, 1])}
    with pytest.raises(DatasetError, match="tiny has 5 training tokens, too few for one sample"):
        plan_for(weighted, [], split=(0.5, 0.5), steps=4, global_batch=4)
    with pytest.raises(DatasetError, match="data.sources.t has no training documents long enough"):
        plan_for({"t": SourceConfig(prefixes=[tiny])}, [], split=(0.5, 0.5), steps=4, global_batch=4)
