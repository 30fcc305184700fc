"""Tokenizers behind one interface: encode, decode, vocab_size, eod."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special tokens. Needs no files and never fails to encode."""

    name = "byte"
    eod = 256  # end of document
    pad = 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def build_tokenizer(kind: str) -> ByteTokenizer:
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer={kind!r}: unknown tokenizer; use 'byte'")
