"""From a config's sources and phases to a checked plan, and from the plan to sample streams.

`make_plan` opens only the `.idx` files: it resolves and checks every prefix, splits
documents into train and validation, computes the phase schedule and how many epochs of
each source it reads, and refuses `max_epochs` overruns. It is what `tools.blend_plan`
prints. `TrainingStreams` then builds the GPT sample indices (megatron-core) for exactly
the samples the plan draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.blend import BlendSchedule, PhaseConfig, SourceConfig, greedy_blend, phase_boundaries
from data.embedded import resolve_prefix
from data.gpt_dataset import PrefixSamples, samples_per_epoch
from data.indexed import DatasetError, open_indexed_dataset


@dataclass(kw_only=True)
class Prefix:
    path: str
    dataset: object  # megatron-core IndexedDataset
    train_docs: np.ndarray
    valid_docs: np.ndarray

    def tokens(self, docs: np.ndarray) -> int:
        return int(self.dataset.sequence_lengths[docs].sum()) if len(docs) else 0

    def samples(self, seq_length: int, *, validation: bool) -> int:
        """Samples in one epoch of this prefix's training (or validation) documents."""
        return samples_per_epoch(self.tokens(self.valid_docs if validation else self.train_docs), seq_length)


@dataclass(kw_only=True)
class Source:
    name: str
    prefixes: list[Prefix]
    weights: np.ndarray  # within the source, normalised
    max_epochs: float | None = None

    @property
    def train_tokens(self) -> int:
        return sum(p.tokens(p.train_docs) for p in self.prefixes)

    def draws(self, samples: int) -> np.ndarray:
        """How many samples each prefix gives when the source gives `samples`."""
        if len(self.prefixes) == 1:
            return np.array([samples])
        return np.bincount(greedy_blend(self.weights, samples)[0], minlength=len(self.prefixes))


class DataPlan:
    def __init__(self, sources: list[Source], validation: list[Source], schedule: BlendSchedule, *, seq_length: int,
                 split: tuple[float, float]):
        self.sources, self.validation, self.schedule = sources, validation, schedule
        self.seq_length, self.split = seq_length, split

    def source_epochs(self, samples: np.ndarray) -> list[float]:
        """Passes over each source that `samples[s]` samples of it make (its most-read prefix counts)."""
        out = []
        for source, n in zip(self.sources, samples):
            per_prefix = source.draws(int(n))
            out.append(max(k / p.samples(self.seq_length, validation=False) if k else 0.0
                           for k, p in zip(per_prefix, source.prefixes)))
        return out

    def check_epochs(self) -> None:
        for source, used in zip(self.sources, self.source_epochs(self.schedule.samples_per_source)):
            if source.max_epochs is not None and used > source.max_epochs:
                raise DatasetError(
                    f"data.sources.{source.name}: the schedule reads it {used:.2f} times, more than its max_epochs="
                    f"{source.max_epochs:g}: lower its phase weights, add data, or raise max_epochs"
                )

    def report(self) -> str:
        """Per phase and source: samples, tokens, realised share and cumulative epochs; what tools.blend_plan prints."""
        s = self.schedule
        counts = s.phase_counts()
        lines = [f"{'phase':<16} {'source':<16} {'samples':>10} {'tokens':>14} {'share':>8} {'target':>8} "
                 f"{'epochs':>8}"]
        cumulative = np.zeros(len(self.sources), dtype=np.int64)
        for k, name in enumerate(s.phase_names):
            cumulative += counts[k]
            total = counts[k].sum()
            target = s.phase_weights[k] / s.phase_weights[k].sum()
            read = self.source_epochs(cumulative)
            for j, source in enumerate(self.sources):
                lines.append(
                    f"{name:<16} {source.name:<16} {counts[k, j]:>10,} {counts[k, j] * self.seq_length:>14,} "
                    f"{counts[k, j] / total:>8.2%} {target[j]:>8.2%} {read[j]:>8.3f}"
                )
        total = s.samples_per_source
        read = self.source_epochs(total)
        for j, source in enumerate(self.sources):
            limit = f" (max {source.max_epochs:g})" if source.max_epochs is not None else ""
            lines.append(
                f"{'run':<16} {source.name:<16} {total[j]:>10,} {total[j] * self.seq_length:>14,} "
                f"{total[j] / total.sum():>8.2%} {'':>8} {read[j]:>8.3f}{limit}"
            )
        return "\n".join(lines)


def _open_prefixes(name: str, raw_prefixes: list[str], *, vocab_size: int, train_share: float, cache_dir: str | None,
                   field_name: str) -> list[Prefix]:
    """Open and check a source's prefixes; the first `train_share` of each prefix's documents train, the rest
    are held out."""
    prefixes = []
    for raw in raw_prefixes:
        try:
            path = resolve_prefix(raw, cache_dir)
            dataset = open_indexed_dataset(path, vocab_size)
        except DatasetError as err:
            raise DatasetError(f"{field_name}.{name}: {err}") from None
        n = len(dataset.sequence_lengths)
        cut = int(round(n * train_share))
        prefixes.append(Prefix(path=path, dataset=dataset, train_docs=np.arange(cut), valid_docs=np.arange(cut, n)))
    return prefixes


def _weighted(name: str, prefixes: list[Prefix], *, weights: list[float] | None, max_epochs: float | None,
              seq_length: int, validation: bool, field_name: str) -> Source:
    """The source weighted for training, or (`validation`) for its held-out documents."""
    if weights is not None and not validation:
        w = np.asarray(weights, dtype=np.float64)
    else:  # in proportion to the tokens the source serves, leaving out prefixes too small for one sample
        w = np.asarray([p.tokens(p.valid_docs if validation else p.train_docs)
                        if p.samples(seq_length, validation=validation) else 0 for p in prefixes], dtype=np.float64)
    kind = "validation" if validation else "training"
    for p, weight in zip(prefixes, w):
        if weight > 0 and not p.samples(seq_length, validation=validation):
            raise DatasetError(
                f"{field_name}.{name}: {p.path} has {p.tokens(p.valid_docs if validation else p.train_docs)} {kind} "
                f"tokens, too few for one sample of model.seq_length+1={seq_length + 1}: give it weight 0, add data "
                "or change data.split"
            )
    if w.sum() <= 0:
        raise DatasetError(
            f"{field_name}.{name} has no {kind} documents long enough for one sample of {seq_length + 1} tokens: "
            "add data, shorten model.seq_length or change data.split"
        )
    return Source(name=name, prefixes=prefixes, weights=w / w.sum(), max_epochs=max_epochs)


def make_plan(
    sources: dict[str, SourceConfig], phases: list[PhaseConfig], *, validation: dict[str, list[str]],
    split: tuple[float, float], total_steps: int, global_batch: int, seq_length: int, vocab_size: int,
    cache_dir: str | None = None,
) -> DataPlan:
    """Check every prefix and the schedule; raises DatasetError or ScheduleError naming the field."""
    train_share = 1.0 if validation else split[0]
    prefixes = {n: _open_prefixes(n, c.prefixes, vocab_size=vocab_size, train_share=train_share, cache_dir=cache_dir,
                                  field_name="data.sources")
                for n, c in sources.items()}
    opened = [_weighted(n, prefixes[n], weights=c.weights, max_epochs=c.max_epochs, seq_length=seq_length,
                        validation=False, field_name="data.sources")
              for n, c in sources.items()]
    if validation:
        held_out = [_weighted(n, _open_prefixes(n, p, vocab_size=vocab_size, train_share=0.0, cache_dir=cache_dir,
                                                field_name="data.validation"),
                              weights=None, max_epochs=None, seq_length=seq_length, validation=True,
                              field_name="data.validation")
                    for n, p in validation.items()]
    else:  # each source's held-out documents (the same opened prefixes), where they make at least one sample
        held_out = [_weighted(n, prefixes[n], weights=c.weights, max_epochs=None, seq_length=seq_length,
                              validation=True, field_name="data.sources")
                    for n, c in sources.items() if any(p.samples(seq_length, validation=True) for p in prefixes[n])]
    names = [s.name for s in opened]
    if phases:
        weights = np.array([[p.weights.get(n, 0.0) for n in names] for p in phases])
        phase_names = [p.name or f"phase{k + 1}" for k, p in enumerate(phases)]
        ends = phase_boundaries(phases, total_steps, global_batch * seq_length)
    else:  # one phase, sources in proportion to their tokens
        weights = np.array([[s.train_tokens for s in opened]], dtype=np.float64)
        phase_names, ends = ["all"], [total_steps]
    schedule = BlendSchedule(names, phase_names, weights, phase_ends=ends, global_batch=global_batch)
    plan = DataPlan(opened, held_out, schedule, seq_length=seq_length, split=(train_share, 1.0 - train_share))
    plan.check_epochs()
    return plan


class SourceStream:
    """The samples of one source in order: a greedy blend of its prefixes' sample streams."""

    def __init__(self, source: Source, size: int, *, seq_length: int, seed: int, tokenizer, split,
                 is_validation: bool, cache_dir: str | None):
        self.name = source.name
        self.size = size
        self.blend = greedy_blend(source.weights, size) if len(source.prefixes) > 1 else None
        self.needed = needed = source.draws(size)
        self.prefixes = [
            PrefixSamples(p.path, p.dataset, p.valid_docs if is_validation else p.train_docs, seq_length=seq_length,
                          seed=seed, tokenizer=tokenizer, split=split, is_validation=is_validation,
                          cache_dir=cache_dir) if n else None
            for p, n in zip(source.prefixes, needed)
        ]

    def __len__(self) -> int:
        return self.size

    def build_indices(self) -> None:
        """Build (or load) the sample indices of every epoch this stream will read."""
        for prefix, n in zip(self.prefixes, self.needed):
            if prefix is not None:
                for epoch in range(-(-int(n) // prefix.samples_per_epoch)):
                    prefix.epoch(epoch)

    def __getitem__(self, k: int) -> np.ndarray:
        if self.blend is None:
            return self.prefixes[0][k]
        which, index = self.blend
        return self.prefixes[which[k]][int(index[k])]


class TrainingStreams:
    """The run's global training stream (sample i of the schedule) and its validation streams."""

    def __init__(self, plan: DataPlan, *, seed: int, tokenizer, eval_samples: int, cache_dir: str | None = None):
        self.plan, self.schedule = plan, plan.schedule
        counts = self.schedule.samples_per_source
        shared = dict(seq_length=plan.seq_length, seed=seed, tokenizer=tokenizer, split=plan.split, cache_dir=cache_dir)
        self.train = [SourceStream(s, int(n), is_validation=False, **shared) for s, n in zip(plan.sources, counts)]
        self.validation = [
            SourceStream(s, eval_samples, is_validation=True, **shared) for s in plan.validation
        ] if eval_samples else []

    def __len__(self) -> int:
        return len(self.schedule)

    def build_indices(self) -> None:
        for stream in self.train + self.validation:
            stream.build_indices()

    def __getitem__(self, i: int) -> np.ndarray:
        return self.train[self.schedule.source[i]][int(self.schedule.index[i])]
