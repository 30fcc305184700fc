"""Blends and phase schedules: which source, and which sample of it, each global sample index gets.

A run of S steps of G sequences draws N = S * G samples. Phases split those steps in
order (phase k ends at step round(S * cumulative share of phases 0..k)); inside a phase
the next sample comes from the source whose realised share lags its target most (the
greedy rule of Megatron's blended datasets), so the mixture is exact at every prefix of
the phase. Each source is one stream across phases: phase 2 continues a source where
phase 1 left it. Everything is a pure function of the schedule, so a resumed run, a
data-parallel rank or `tools.blend_plan` all see the same mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data.indexed import megatron_helpers
from parallel.errors import FoldtronError


class ScheduleError(FoldtronError, ValueError):
    """Phases or weights that do not make a schedule; the message names the phase and the fix."""


@dataclass
class SourceConfig:
    """One data source: indexed-dataset prefixes (`embedded:NAME` for a built-in corpus), optionally weighted."""

    prefixes: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # within the source; null: in proportion to each prefix's tokens
    max_epochs: Optional[float] = None  # refuse a schedule that reads this source more often than this


@dataclass(kw_only=True)
class PhaseConfig:
    """One phase of the schedule: its length (tokens or a fraction of the run) and the weight of each source."""

    name: Optional[str] = None
    tokens: Optional[int] = None  # training tokens in this phase
    fraction: Optional[float] = None  # or: share of the run's steps; the last phase may give neither (the rest)
    weights: dict[str, float] = field(default_factory=dict)  # source name -> weight; missing sources get 0


def greedy_blend(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For `size` draws: which entry each draw takes (int16) and its running count in that entry (int64).

    Zero-weight entries are left out before megatron-core's helper runs: its tie-break
    would otherwise pick one when every positive entry is exactly on target.
    """
    weights = np.asarray(weights, dtype=np.float64)
    active = np.flatnonzero(weights > 0)
    if size and not len(active):
        raise ScheduleError("every weight of the blend is zero")
    which = np.zeros(size, dtype=np.int16)
    counter = np.zeros(size, dtype=np.int64)
    if size:
        megatron_helpers().build_blending_indices(which, counter, weights[active] / weights[active].sum(), len(active),
                                                  size, False)  # verbose=False: a compiled helper, positional only
        which = active[which].astype(np.int16)
    return which, counter


def phase_boundaries(phases: list[PhaseConfig], total_steps: int, tokens_per_step: int) -> list[int]:
    """The step at which each phase ends; raises ScheduleError naming the phase whose length does not fit."""
    ends, cumulative = [], 0.0
    for k, phase in enumerate(phases):
        label = f"data.phases[{k}]" + (f" ({phase.name})" if phase.name else "")
        if phase.tokens is not None and phase.fraction is not None:
            raise ScheduleError(f"{label}: give tokens or fraction, not both")
        if phase.tokens is not None:
            cumulative += phase.tokens / (total_steps * tokens_per_step)
        elif phase.fraction is not None:
            cumulative += phase.fraction
        elif k == len(phases) - 1:
            cumulative = max(cumulative, 1.0)
        else:
            raise ScheduleError(f"{label}: give its length (tokens or fraction); only the last phase may take the rest")
        if cumulative > 1.0 + 1e-9:
            raise ScheduleError(
                f"{label}: the phases add up to {cumulative:.4g} of the run ({total_steps} steps of "
                f"{tokens_per_step} tokens): shorten them, or raise train.iters"
            )
        ends.append(round(cumulative * total_steps))
    if ends and ends[-1] < total_steps:
        raise ScheduleError(
            f"the phases cover {ends[-1]} of train.iters={total_steps} steps: lengthen them, "
            "or give the last phase no length so it takes the rest"
        )
    if any(b <= a for a, b in zip([0] + ends, ends)):
        raise ScheduleError("a phase rounds to zero steps: lengthen it or remove it")
    return ends


class BlendSchedule:
    """The mapping global sample index -> (phase, source, sample index within the source)."""

    def __init__(self, source_names: list[str], phase_names: list[str], phase_weights: np.ndarray, *,
                 phase_ends: list[int], global_batch: int):
        """`phase_weights[k, s]`: weight of source s in phase k (rows need not be normalised)."""
        self.source_names, self.phase_names = list(source_names), list(phase_names)
        self.phase_weights = np.asarray(phase_weights, dtype=np.float64)
        self.sample_ends = np.asarray(phase_ends, dtype=np.int64) * global_batch
        size = int(self.sample_ends[-1])
        self.source = np.zeros(size, dtype=np.int16)
        self.index = np.zeros(size, dtype=np.int64)
        offset = np.zeros(len(source_names), dtype=np.int64)  # samples each source gave in earlier phases
        start = 0
        for k, end in enumerate(self.sample_ends):
            which, counter = greedy_blend(self.phase_weights[k], int(end) - start)
            self.source[start:end] = which
            self.index[start:end] = counter + offset[which]
            offset += np.bincount(which, minlength=len(source_names))
            start = int(end)
        self.samples_per_source = offset

    def __len__(self) -> int:
        return len(self.source)

    def phase_of(self, sample: int) -> int:
        return int(np.searchsorted(self.sample_ends, sample, side="right"))

    def counts(self, start: int, end: int) -> np.ndarray:
        """Samples each source gives in global samples [start, end)."""
        return np.bincount(self.source[start:end], minlength=len(self.source_names))

    def phase_counts(self) -> np.ndarray:
        """[phase, source] samples drawn."""
        starts = np.concatenate([[0], self.sample_ends[:-1]])
        return np.stack([self.counts(int(a), int(b)) for a, b in zip(starts, self.sample_ends)])
