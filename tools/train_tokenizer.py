"""Train a byte-level BPE `tokenizer.json`: `python -m tools.train_tokenizer --input ... --output ... --vocab-size N`.

Byte-level BPE starts from the 256 byte values, so every text encodes without unknown
tokens and decodes back exactly. The texts stream from the same JSON Lines inputs as
tools.preprocess_data; the result loads with data.tokenizers.HFTokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator

from data.jsonl import InputError, expand_inputs, iter_lines, parse_document

from pretrain.cli import USER_ERRORS, print_error

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]  # end of document first: HFTokenizer takes it as eod


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="JSON Lines: a .jsonl(.gz/.zst) file, a folder or a glob")
    p.add_argument("--output", required=True, help="where to write the tokenizer.json")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all: 256 bytes, merges and special tokens")
    p.add_argument("--json-key", default="text", help="the key that holds each document's text (default: text)")
    args = p.parse_args(argv)
    minimum = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < minimum:
        p.error(f"--vocab-size={args.vocab_size}: must be at least {minimum} (256 bytes and the special tokens)")
    return args


class Texts:
    """The texts of the good lines, streamed; counts the documents and the bad lines it skips."""

    def __init__(self, spec: str, key: str):
        self.files, self.key = expand_inputs(spec), key
        self.documents = self.bad_lines = 0

    def __iter__(self) -> Iterator[str]:
        for path, number, line in iter_lines(self.files):
            text, why = parse_document(line, self.key)
            if why is None:
                self.documents += 1
                yield text
            else:
                self.bad_lines += 1
                if self.bad_lines <= 5:
                    print(f"train_tokenizer: skipping bad line {path}:{number}: {why}", file=sys.stderr)


def train(texts: Texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with the ByteLevel decoder that makes decoding exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        texts = Texts(args.input, args.json_key)
        tokenizer = train(texts, args.vocab_size)
        if texts.documents == 0:
            raise InputError(f"input {args.input!r}: no good lines to train on ({texts.bad_lines} bad lines)")
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = f"{args.output}.tmp{os.getpid()}"
        tokenizer.save(tmp)
        os.replace(tmp, args.output)
    except USER_ERRORS as err:
        print_error("train_tokenizer", err)
        return 1
    print(f"wrote {args.output}: {tokenizer.get_vocab_size()} ids from {texts.documents} documents "
          f"({texts.bad_lines} bad lines skipped) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
