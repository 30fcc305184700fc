"""Tokenizers behind one interface: name, encode, decode, vocab_size, eod, pad, think_ids, unique_identifiers.

Three kinds: `byte` (no files), a Hugging Face `tokenizer.json` and a SentencePiece
`.model`. `unique_identifiers` is a plain dict because megatron-core json-serialises it
into the description of every dataset whose index it caches.

`think_ids` are the ids of `<think>` and `</think>` (the delimiters of a thought in the RLP objective,
pretrain/objectives/rlp.py), or None where the tokenizer has none: the byte tokenizer takes the two
spare ids after its vocabulary (they live in the model's padded vocabulary, not in `vocab_size`, so
datasets and their cached indices are unchanged); a tokenizer.json or SentencePiece model has them
when its vocabulary holds those two tokens.
"""

from __future__ import annotations

import os

import numpy as np

from parallel.errors import FoldtronError

# End-of-document markers of common tokenizer.json files, in order of preference.
HF_EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
HF_PAD_TOKENS = ("<|pad|>", "<pad>", "[PAD]")
THINK_TOKENS = ("<think>", "</think>")


class TokenizerError(FoldtronError, ValueError):
    """A tokenizer that cannot be built or cannot serve (unknown kind, missing or unreadable file, no
    end-of-document token)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special tokens. Needs no files and never fails to encode."""

    name = "byte"
    eod = 256  # end of document
    pad = 257
    vocab_size = 258
    think_ids = (258, 259)  # spare ids of the padded vocabulary, outside vocab_size
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 258}

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """The text of the byte ids; the think ids as `<think>` / `</think>`; other special ids dropped."""
        pieces, run = [], bytearray()
        for i in (int(i) for i in ids):
            if 0 <= i < 256:
                run.append(i)
            elif i in self.think_ids:
                pieces += [run.decode("utf-8", errors="replace"), THINK_TOKENS[self.think_ids.index(i)]]
                run = bytearray()
        return "".join(pieces) + run.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

    Text is encoded without the tokenizer's own special tokens (no BOS from a post-processor):
    documents are separated by `eod` alone, as in Megatron's preprocessing with --append-eod.
    """

    name = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = os.path.abspath(path)
        self._tok = Tokenizer.from_file(self.path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # max id + 1, not len(vocab): a vocabulary with holes must still bound every id
        self.vocab_size = max(vocab.values()) + 1
        eod = next((t for t in HF_EOD_TOKENS if t in vocab), None)
        if eod is None:
            raise TokenizerError(
                f"{path}: no end-of-document token; looked for {', '.join(HF_EOD_TOKENS)}; "
                "add one of them as a special token"
            )
        self.eod = vocab[eod]
        self.pad = next((vocab[t] for t in HF_PAD_TOKENS if t in vocab), None)
        self.think_ids = tuple(vocab[t] for t in THINK_TOKENS) if all(t in vocab for t in THINK_TOKENS) else None
        self.unique_identifiers = {"class": "HFTokenizer", "path": self.path, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
    """A SentencePiece `.model`; its end-of-sentence id marks the end of a document."""

    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        self.path = os.path.abspath(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise TokenizerError(
                f"{path}: the SentencePiece model has no end-of-sentence (eos) id; train it with eos_id >= 0"
            )
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        unknown = self._sp.unk_id()
        think = tuple(self._sp.piece_to_id(t) for t in THINK_TOKENS)
        self.think_ids = think if unknown not in think else None
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "path": self.path, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


TOKENIZERS = {"hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer}


CONFIG_FIELDS = ("data.tokenizer", "data.tokenizer_path")
TOOL_FLAGS = ("--tokenizer-type", "--tokenizer-path")  # the same two settings in tools/


def build_tokenizer(kind: str, path: str | None = None, fields: tuple[str, str] = CONFIG_FIELDS):
    """The tokenizer `kind` ("byte", "hf", "sentencepiece"); hf and sentencepiece read the file at `path`.

    Errors name `fields`, where the user set kind and path: the config's fields, or a tool's flags.
    """
    kind_field, path_field = fields
    if kind == "byte":
        return ByteTokenizer()
    if kind not in TOKENIZERS:
        raise TokenizerError(f"{kind_field}={kind!r}: unknown tokenizer; use one of byte, hf, sentencepiece")
    what = "a tokenizer.json" if kind == "hf" else "a SentencePiece .model"
    if not path:
        raise TokenizerError(f"{kind_field}={kind} needs {path_field}: set it to {what} file")
    if not os.path.isfile(path):
        raise TokenizerError(f"{path_field}={path!r} does not exist; set it to {what} file")
    try:
        return TOKENIZERS[kind](path)
    except TokenizerError:
        raise
    except Exception as e:  # the libraries raise their own exception types for unreadable files
        raise TokenizerError(f"{path_field}={path!r} cannot be read as {what} ({e}); set it to {what} file") from e
