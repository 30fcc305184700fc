"""Random token ids instead of a dataset (`data.synthetic`): what a benchmark trains on, with no files at all.

Sample i of the run is `seq_length + 1` ids drawn uniformly from [0, the tokenizer's vocabulary) by a
generator seeded with (seed, stream, i). Like a real stream it is a pure function of the seed and the
global sample index, so a resumed run and every data-parallel layout read the same samples; unlike one,
nothing is opened, no index is built and a sample costs a few microseconds. The validation stream (one
set, named like the source) draws from another key, so it never repeats a training sample.

`SyntheticPlan` and `SyntheticStreams` have what the trainer and the loader read from `DataPlan` and
`TrainingStreams` (data/sources.py): one source, `synthetic`, in one phase, `all`; sample lookup by
global index; the per-source counts of a range of samples; a report in `tools.blend_plan`'s format.
"""

from __future__ import annotations

import numpy as np

SOURCE = "synthetic"
PHASE = "all"
_TRAIN_KEY, _VALIDATION_KEY = 0, 1


class SyntheticStream:
    """`size` samples of `seq_length + 1` random ids in [0, vocab_size), sample i keyed by (seed, key, i)."""

    def __init__(self, *, size: int, seq_length: int, vocab_size: int, seed: int, key: int):
        self.name = SOURCE
        self.size, self.seq_length, self.vocab_size = size, seq_length, vocab_size
        self.entropy = [seed % 2**64, key]  # SeedSequence takes non-negative integers only

    def __len__(self) -> int:
        return self.size

    def build_indices(self) -> None:
        """Nothing to build: the interface of a real stream's index building."""

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} of a synthetic stream of {self.size}")
        generator = np.random.default_rng([*self.entropy, i])  # its own generator: no state shared between samples
        return generator.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)


class SyntheticSchedule:
    """The one-source, one-phase schedule: what the trainer reads from a BlendSchedule (counts per source, the
    phase of a sample, names), without its per-sample arrays (a synthetic run may be long)."""

    source_names = [SOURCE]
    phase_names = [PHASE]

    def __init__(self, samples: int):
        self.samples = samples
        self.samples_per_source = np.array([samples], dtype=np.int64)

    def __len__(self) -> int:
        return self.samples

    def phase_of(self, sample: int) -> int:
        return 0

    def counts(self, start: int, end: int) -> np.ndarray:
        """Samples the source gives in global samples [start, end)."""
        return np.array([max(0, min(end, self.samples) - max(start, 0))], dtype=np.int64)

    def phase_counts(self) -> np.ndarray:
        return self.samples_per_source[None]


class SyntheticPlan:
    """The plan of a synthetic run: `total_steps` x `global_batch` samples of random ids below `vocab_size`."""

    def __init__(self, *, total_steps: int, global_batch: int, seq_length: int, vocab_size: int):
        self.schedule = SyntheticSchedule(total_steps * global_batch)
        self.seq_length, self.vocab_size = seq_length, vocab_size
        self.sources = [SOURCE]  # the trainer counts them
        self.validation = [SOURCE]

    def report(self) -> str:
        """One line on what is drawn, then the table of `DataPlan.report` (no epochs: nothing is read twice)."""
        samples = int(self.schedule.samples)
        header = (f"{'phase':<16} {'source':<16} {'samples':>10} {'tokens':>14} {'share':>8} {'target':>8} "
                  f"{'epochs':>8}")
        rows = [f"{name:<16} {SOURCE:<16} {samples:>10,} {samples * self.seq_length:>14,} {1:>8.2%} "
                f"{target:>8} {'-':>8}" for name, target in ((PHASE, f"{1:.2%}"), ("run", ""))]
        return "\n".join([f"random token ids in [0, {self.vocab_size}) (data.synthetic): no files are read",
                          header, *rows])


class SyntheticStreams:
    """The global training stream of a synthetic plan and, with `eval_samples`, its one validation stream."""

    def __init__(self, plan: SyntheticPlan, *, seed: int, eval_samples: int):
        self.plan, self.schedule = plan, plan.schedule
        shared = dict(seq_length=plan.seq_length, vocab_size=plan.vocab_size, seed=seed)
        self.train = [SyntheticStream(size=len(plan.schedule), key=_TRAIN_KEY, **shared)]
        self.validation = [SyntheticStream(size=eval_samples, key=_VALIDATION_KEY, **shared)] if eval_samples else []

    def __len__(self) -> int:
        return len(self.schedule)

    def build_indices(self) -> None:
        """Nothing to build (the trainer calls it on rank 0 first, as for real data)."""

    def __getitem__(self, i: int) -> np.ndarray:
        return self.train[0][i]
