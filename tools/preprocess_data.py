"""JSON Lines to a Megatron indexed dataset: `python -m tools.preprocess_data --input ... --output-prefix ...`.

Lines are read as a stream, cut into batches and tokenized by worker processes; results
come back in input order, so the output does not depend on --workers. At most a few
batches per worker are in flight, which keeps memory flat whatever the input size.
The dataset is written by megatron-core's builder under a temporary name and renamed
when complete; a failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data.indexed import megatron_indexed, token_dtype, write_indexed_dataset
from data.jsonl import InputError, expand_inputs, iter_lines, parse_document
from data.tokenizers import TOOL_FLAGS, build_tokenizer

from parallel.errors import FoldtronError
from pretrain.cli import USER_ERRORS, print_error

BATCH_LINES = 256
BATCH_BYTES = 1 << 20  # also close a batch at 1 MiB, so long documents still spread over the workers
IN_FLIGHT_PER_WORKER = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="preprocess_data", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="JSON Lines: a .jsonl(.gz/.zst) file, a folder or a glob")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text", help="the key that holds each document's text (default: text)")
    p.add_argument("--tokenizer-type", choices=["byte", "hf", "sentencepiece"], default="byte")
    p.add_argument("--tokenizer-path", help="tokenizer.json (hf) or .model (sentencepiece)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad line instead of counting it")
    p.add_argument("--log-bad-lines", type=int, default=5, metavar="N", help="print the first N bad lines (default: 5)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers={args.workers}: must be at least 1")
    return args


# Per-process tokenizing state, set once by init_worker (the Pool initializer).
_worker: dict = {}


def init_worker(kind: str, path: str | None, *, key: str, append_eod: bool, dtype: type) -> None:
    _worker.update(tokenizer=build_tokenizer(kind, path), key=key, append_eod=append_eod, dtype=dtype)


def tokenize_batch(lines: list[bytes]) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Tokenize one batch: (its tokens back to back, the length of each good line, (index, why) per bad line).

    One array per batch rather than one per document, in the output dtype: less to pickle back.
    """
    tokenizer, key, dtype = _worker["tokenizer"], _worker["key"], _worker["dtype"]
    docs, lengths, bad = [], [], []
    for i, line in enumerate(lines):
        text, why = parse_document(line, key)
        if why is not None:
            bad.append((i, why))
            continue
        ids = tokenizer.encode(text)
        if _worker["append_eod"]:
            ids = np.append(ids, tokenizer.eod)
        docs.append(ids)
        lengths.append(len(ids))
    tokens = np.concatenate(docs).astype(dtype) if docs else np.empty(0, dtype=dtype)
    return tokens, lengths, bad


def batches(lines: Iterator[tuple[str, int, bytes]]) -> Iterator[tuple[list[tuple[str, int]], list[bytes]]]:
    """(where each line is, the raw lines) in batches of at most BATCH_LINES lines or about BATCH_BYTES bytes."""
    where, raws, size = [], [], 0
    for path, number, raw in lines:
        where.append((path, number))
        raws.append(raw)
        size += len(raw)
        if len(raws) >= BATCH_LINES or size >= BATCH_BYTES:
            yield where, raws
            where, raws, size = [], [], 0
    if raws:
        yield where, raws


def tokenized_batches(args, dtype: type, work: Iterator) -> Iterator:
    """(where, raw size, tokenize_batch result) per batch, in input order, with --workers processes."""
    init = functools.partial(init_worker, args.tokenizer_type, args.tokenizer_path, key=args.json_key,
                             append_eod=args.append_eod, dtype=dtype)
    if args.workers == 1:
        init()
        for where, raws in work:
            yield where, sum(map(len, raws)), tokenize_batch(raws)
        return
    with multiprocessing.Pool(args.workers, initializer=init) as pool:
        pending = deque()
        for where, raws in work:
            pending.append((where, sum(map(len, raws)), pool.apply_async(tokenize_batch, (raws,))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * args.workers:
                where, size, result = pending.popleft()
                yield where, size, result.get()
        while pending:
            where, size, result = pending.popleft()
            yield where, size, result.get()


@dataclass(kw_only=True)
class Stats:
    """What the progress bar and the summary report."""

    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    bytes_read: int = 0


class BadLine(FoldtronError, ValueError):
    """A bad input line under --strict."""


def documents(args, dtype: type, *, stats: Stats, bar: tqdm) -> Iterator[np.ndarray]:
    """Every good line's tokens, in input order; counts and reports the bad lines as it goes."""
    work = batches(iter_lines(expand_inputs(args.input)))
    # closing: on an error, stop the worker pool at once rather than when the generator is collected
    with contextlib.closing(tokenized_batches(args, dtype, work)) as results:
        for where, size, (tokens, lengths, bad) in results:
            for i, why in bad:
                path, number = where[i]
                if args.strict:
                    raise BadLine(f"{path}:{number}: {why} (--strict stops at the first bad line)")
                stats.bad_lines += 1
                if stats.bad_lines <= args.log_bad_lines:
                    tqdm.write(f"preprocess_data: bad line {path}:{number}: {why}", file=sys.stderr)
            if lengths:
                yield from np.split(tokens, np.cumsum(lengths)[:-1])
            stats.documents += len(lengths)
            stats.tokens += len(tokens)
            stats.bytes_read += size
            bar.update(len(lengths))
            bar.set_postfix(tokens=stats.tokens, MB=round(stats.bytes_read / 1e6, 1), refresh=False)
    if stats.documents == 0:
        raise InputError(f"input {args.input!r}: no good lines, so no documents ({stats.bad_lines} bad lines)")


def run(args, tokenizer) -> Stats:
    dtype = token_dtype(tokenizer.vocab_size)
    stats = Stats()
    with tqdm(desc="preprocess_data", unit=" docs", file=sys.stderr, disable=None) as bar:
        write_indexed_dataset(args.output_prefix, documents(args, dtype, stats=stats, bar=bar), dtype)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_path, TOOL_FLAGS)
        megatron_indexed()  # seconds of imports, before the clock starts: time the preprocessing alone
        start = time.perf_counter()
        stats = run(args, tokenizer)
    except USER_ERRORS as err:  # InputError, BadLine, DatasetError, tokenizer and file errors
        print_error("preprocess_data", err)
        return 1
    seconds = time.perf_counter() - start
    shown = f" (first {min(stats.bad_lines, args.log_bad_lines)} shown above)" if stats.bad_lines else ""
    print(f"wrote {args.output_prefix}.bin/.idx\n"
          f"  documents  {stats.documents}\n"
          f"  tokens     {stats.tokens}\n"
          f"  bad lines  {stats.bad_lines}{shown}\n"
          f"  seconds    {seconds:.2f}\n"
          f"  tokens/s   {stats.tokens / seconds:,.0f}\n"
          f"  docs/s     {stats.documents / seconds:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
