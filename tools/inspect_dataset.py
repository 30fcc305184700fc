"""Look inside a Megatron indexed dataset: `python -m tools.inspect_dataset PREFIX [--tokenizer-type ...] [--show N]`.

Validates PREFIX.idx/.bin first (a corrupt file gets a one-line error, not a traceback),
then prints counts and document-length statistics, and with a tokenizer decodes the
first documents, to check by eye that a dataset holds what it should.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data.indexed import DatasetError, check_indexed_dataset, open_indexed_dataset
from data.tokenizers import TOOL_FLAGS, build_tokenizer

from pretrain.cli import USER_ERRORS, print_error

SHOW_CHARS = 300


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inspect_dataset", description=__doc__.split("\n")[0])
    p.add_argument("prefix", help="the dataset: PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-type", choices=["byte", "hf", "sentencepiece"], help="decode documents with it")
    p.add_argument("--tokenizer-path", help="tokenizer.json (hf) or .model (sentencepiece)")
    p.add_argument("--show", type=int, default=3, metavar="N", help="decode the first N documents (default: 3)")
    return p.parse_args(argv)


def document_lengths(dataset) -> np.ndarray:
    """Tokens per document: the sequences between consecutive document boundaries, summed."""
    per_sequence = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    return np.diff(per_sequence[dataset.document_indices])


def describe(prefix: str, tokenizer, show: int) -> str:
    sequences, documents, dtype = check_indexed_dataset(prefix)
    dataset = open_indexed_dataset(prefix)
    lengths = document_lengths(dataset)
    lines = [
        f"{prefix}",
        f"  documents  {documents - 1}",  # the index stores one boundary more than there are documents
        f"  sequences  {sequences}",
        f"  tokens     {int(dataset.sequence_lengths.sum(dtype=np.int64))}",
        f"  dtype      {np.dtype(dtype).name}",
    ]
    if len(lengths):
        p50, p90 = np.percentile(lengths, [50, 90])
        lines.append(
            f"  document length (tokens): min {lengths.min()}  mean {lengths.mean():.1f}  "
            f"median {p50:.0f}  p90 {p90:.0f}  max {lengths.max()}"
        )
    if tokenizer is not None:
        for doc in range(min(show, len(lengths))):
            first, last = dataset.document_indices[doc], dataset.document_indices[doc + 1]
            ids = np.concatenate([dataset[i] for i in range(first, last)]) if last > first else []
            if len(ids) and int(np.max(ids)) >= tokenizer.vocab_size:
                raise DatasetError(f"document {doc} has id {int(np.max(ids))}, beyond the tokenizer's "
                                 f"{tokenizer.vocab_size} ids: the dataset was made with another tokenizer")
            text = tokenizer.decode(ids)
            more = f"... ({len(text) - SHOW_CHARS} more characters)" if len(text) > SHOW_CHARS else ""
            lines.append(f"--- document {doc} ({len(ids)} tokens)\n{text[:SHOW_CHARS]}{more}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = None
        if args.tokenizer_type:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_path, TOOL_FLAGS)
        print(describe(args.prefix, tokenizer, args.show))
    except USER_ERRORS as err:
        print_error("inspect_dataset", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
