"""Synthetic corpora where a thought helps (for RLP): key sequences on a digit calculator, with and without
their worked values.

A problem is a start digit, three operations and `=`, then the result and a newline:

    7+*~=6

The operations act on a digit mod 10: `+` adds 1, `-` subtracts 1, `*` multiplies by 3, `/` divides by 3
(multiplies by 7, its inverse mod 10), `~` negates; they apply left to right: 7, +1 -> 8, *3 -> 4, ~ -> 6.
The thought writes the value after each step, from the start digit to the result, which the answer then
repeats:

    7+*~=<think>7846</think>6

Why a tiny model needs the thought. Without it the answer is a composition of three of five maps of the
digits: one forward pass must either hold the table of its 1,250 cases or apply the three operations one
after another inside its few layers. With it, every token is easy: the first value copies the start digit
(at a fixed distance back), each next value is one operation (at a fixed distance back) applied to the
value just written (a table of 50 cases), and the answer copies the last value. Measured with
examples/rlp_pretrain.yaml (1.9M parameters, 600 steps of next-token prediction on `digits-think`, 2.6
minutes on 2 CPU cores), mean log p of the answer at the 3,225 answers of the 400 held-out `digits`
documents: -2.26 without a thought (chance: -2.30), -0.001 after the gold thought, -5.13 after an empty
`<think></think>`, -0.001 after the model's own greedy thought (every one of them the gold thought).

A document is 4 to 12 problems and an end-of-document id. Two corpora share the same documents:
- `digits`: no thoughts; what RLP trains on and what a held-out measurement reads;
- `digits-think`: the same documents, a share of them (THINK_SHARE, drawn per document) with the thought
  of every problem written between its `=` and its answer; next-token pretraining on it gives a model the
  prior that RLP then exploits.

Document i of both is drawn by a generator keyed by (SEED, i): the corpora are deterministic and the same
on every machine (tests/test_thinking_corpus.py pins their bytes for VERSION), and a data.split over
documents holds out the same documents of both: the held-out documents of `digits` were never read by a
model pretrained on the training part of `digits-think` (their problems were, in other documents: there
are only 1,250).

One answer per problem of 7 tokens: 1/7 of the positions of `digits` (14.0% with the end-of-document
ids) are answers. The others are the random start digit and operations (no thought can predict them)
and the fixed `=` and newline. The thought ids are the byte tokenizer's `think_ids` (258, 259), outside
its vocab_size: they live in the model's padded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data.tokenizers import ByteTokenizer

SEED = 20251001  # keys every document; changing it, or anything below, changes the corpora: bump VERSION
VERSION = "v1"  # part of the cached datasets' names
DOCUMENTS = 20_000
PROBLEMS = (4, 12)  # problems per document, inclusive
STEPS = 3  # operations per problem
THINK_SHARE = 0.4  # of the documents of `digits-think` that carry thoughts
OPERATIONS = {  # symbol -> the digit it makes of a digit
    "+": lambda d: (d + 1) % 10,
    "-": lambda d: (d - 1) % 10,
    "*": lambda d: 3 * d % 10,
    "/": lambda d: 7 * d % 10,
    "~": lambda d: -d % 10,
}
SYMBOLS = tuple(OPERATIONS)

ZERO, EQUALS, NEWLINE = ord("0"), ord("="), ord("\n")
THINK, END_THINK = ByteTokenizer.think_ids
EOD = ByteTokenizer.eod
PROBLEM_TOKENS = 1 + STEPS + 1  # the start digit, the operations, `=`


@dataclass(frozen=True)
class Problem:
    """One problem of a document, with where its answer is and its gold thought."""

    start: int
    operations: str
    answer: int
    position: int  # of the answer's id in the document
    thought: tuple[int, ...]  # the ids between <think> and </think>


def values(start: int, operations: str) -> list[int]:
    """The value after each step: the start digit, then one value per operation; the last is the answer."""
    out = [start]
    for symbol in operations:
        out.append(OPERATIONS[symbol](out[-1]))
    return out


def thought_of(start: int, operations: str) -> tuple[int, ...]:
    """The ids of the gold thought, without its delimiters."""
    return tuple(ZERO + v for v in values(start, operations))


def draw(index: int, seed: int = SEED) -> tuple[list[tuple[int, str]], bool]:
    """Document `index`'s problems (start digit, operations) and whether `digits-think` gives it thoughts."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(PROBLEMS[0], PROBLEMS[1] + 1))
    starts = rng.integers(0, 10, size=count)
    operations = rng.integers(0, len(SYMBOLS), size=(count, STEPS))
    problems = [(int(s), "".join(SYMBOLS[o] for o in row)) for s, row in zip(starts, operations)]
    return problems, bool(rng.random() < THINK_SHARE)


def render(problems: list[tuple[int, str]], think: bool) -> np.ndarray:
    """The ids of a document of these problems, with their thoughts when `think`, ending in the eod id."""
    ids: list[int] = []
    for start, operations in problems:
        ids += [ZERO + start, *(ord(s) for s in operations), EQUALS]
        if think:
            ids += [THINK, *thought_of(start, operations), END_THINK]
        ids += [ZERO + values(start, operations)[-1], NEWLINE]
    ids.append(EOD)
    return np.asarray(ids, dtype=np.int32)


def documents(*, think: bool, count: int = DOCUMENTS, seed: int = SEED) -> Iterator[np.ndarray]:
    """The documents of `digits` (think=False) or `digits-think`, as token ids ending in the eod id."""
    for i in range(count):
        problems, thinks = draw(i, seed)
        yield render(problems, think and thinks)


def problems(doc) -> list[Problem]:
    """The problems of a document of either corpus, read from its ids (a thought, if any, is stepped over)."""
    doc = np.asarray(doc)
    out = []
    for eq in np.flatnonzero(doc == EQUALS):
        start = int(doc[eq - PROBLEM_TOKENS + 1]) - ZERO
        operations = "".join(chr(int(i)) for i in doc[eq - STEPS:eq])
        position = int(eq) + 1
        if doc[position] == THINK:
            position += int(np.flatnonzero(doc[position:] == END_THINK)[0]) + 1
        out.append(Problem(start=start, operations=operations, answer=int(doc[position]) - ZERO, position=position,
                           thought=thought_of(start, operations)))
    return out
