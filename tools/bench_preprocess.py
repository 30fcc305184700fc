"""Preprocessing throughput on the embedded corpus: `python -m tools.bench_preprocess [--workers 1 2] [--limit-mb N]`.

Writes the standard-library corpus (data/embedded.py) as JSON Lines to a temporary
folder, runs tools.preprocess_data (byte tokenizer unless told) once per worker count, prints
documents, tokens, seconds and tokens/s for each, and checks that every output is
byte-for-byte the same as the first. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from data.embedded import stdlib_documents
from data.indexed import check_indexed_dataset, megatron_indexed
from tools import preprocess_data


def write_corpus(path: Path, limit_mb: float | None) -> tuple[int, int]:
    """The embedded corpus as JSON Lines at `path`, cut after `limit_mb` MB; returns (documents, bytes)."""
    limit = None if limit_mb is None else int(limit_mb * 1e6)
    documents = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            line = json.dumps(doc) + "\n"
            if limit is not None and size + len(line) > limit:
                break
            f.write(line)
            documents, size = documents + 1, size + len(line)
    return documents, size


def run(jsonl: Path, prefix: Path, *, workers: int, tokenizer: list[str]) -> tuple[int, int, float]:
    """(documents, tokens, seconds) of one preprocess_data run, its own summary silenced."""
    argv = ["--input", str(jsonl), "--output-prefix", str(prefix), "--append-eod", "--workers", str(workers)]
    argv += tokenizer
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = preprocess_data.main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench_preprocess: error: preprocess_data failed with --workers {workers}")
    check_indexed_dataset(str(prefix))
    dataset = megatron_indexed().IndexedDataset(str(prefix))
    return len(dataset), int(dataset.sequence_lengths.sum()), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    p.add_argument("--limit-mb", type=float, help="use only the first N MB of the corpus")
    p.add_argument("--tokenizer-type", choices=["byte", "hf", "sentencepiece"], default="byte")
    p.add_argument("--tokenizer-path", help="tokenizer.json (hf) or .model (sentencepiece)")
    args = p.parse_args(argv)
    tokenizer = ["--tokenizer-type", args.tokenizer_type]
    if args.tokenizer_path:
        tokenizer += ["--tokenizer-path", args.tokenizer_path]
    megatron_indexed()  # import once, outside every timing
    with tempfile.TemporaryDirectory(prefix="bench_preprocess") as tmp:
        jsonl = Path(tmp) / "stdlib.jsonl"
        documents, size = write_corpus(jsonl, args.limit_mb)
        print(f"corpus: {documents} documents, {size / 1e6:.1f} MB of JSON Lines "
              f"({args.tokenizer_type} tokenizer, --append-eod)")
        print(f"{'workers':>7}  {'documents':>9}  {'tokens':>11}  {'seconds':>7}  {'tokens/s':>11}  identical")
        first = None
        for workers in args.workers:
            prefix = Path(tmp) / f"out-w{workers}"
            docs, tokens, seconds = run(jsonl, prefix, workers=workers, tokenizer=tokenizer)
            if first is None:
                first = prefix
            same = all(filecmp.cmp(f"{first}{s}", f"{prefix}{s}", shallow=False) for s in (".bin", ".idx"))
            rate = tokens / seconds
            print(f"{workers:>7}  {docs:>9}  {tokens:>11}  {seconds:>7.2f}  {rate:>11,.0f}  {'yes' if same else 'NO'}")
            if not same:
                print(f"bench_preprocess: error: --workers {workers} output differs from --workers {args.workers[0]}",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
