"""The embedded corpora: the running Python's standard library, as real text every machine has, and synthetic
problems where a thought helps (for RLP).

A config names them as prefixes `embedded:NAME`:
- `stdlib`: every source file of the standard library;
- `code`: the library modules without their tests;
- `tests`: the test suites (files under test/ or tests/ folders, or named test_*.py);
- `docs`: documentation text, the docstrings of the library modules, one document per module;
- `digits`, `digits-think`: key sequences on a digit calculator, without and with their worked values as
  thoughts between the think ids (data/thinking.py).

Every corpus yields its documents as byte-tokenizer ids, so that one path builds them all (a corpus of
token ids, such as one holding the think ids that no text encodes to, needs no text form). Each is built
once into a cache folder, deterministically (sorted files, fixed seeds), as a Megatron indexed dataset
whose name carries the corpus's version (the Python version for the standard library, the generator's
for the synthetic ones); later runs reuse it.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data import thinking
from data.indexed import DatasetError, token_dtype, write_indexed_dataset
from data.tokenizers import ByteTokenizer

PREFIX = "embedded:"


def default_cache_dir() -> str:
    return os.environ.get("FOLDTRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "foldtron")


def _is_test(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in ("test", "tests") for p in parts[:-1]) or parts[-1].startswith("test_")


def stdlib_documents() -> Iterator[dict]:
    """One document per standard-library source file: {"text", "path"}; undecodable files are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield {"text": text, "path": rel}


def _code() -> Iterator[dict]:
    return (d for d in stdlib_documents() if not _is_test(d["path"]))


def _tests() -> Iterator[dict]:
    return (d for d in stdlib_documents() if _is_test(d["path"]))


def _docs() -> Iterator[dict]:
    """The docstrings of each library module (module, classes, functions), joined by blank lines."""
    for doc in _code():
        try:
            tree = ast.parse(doc["text"])
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        texts = [t for t in (ast.get_docstring(n) for n in nodes) if t]
        if texts:
            yield {"text": "\n\n".join(texts) + "\n", "path": doc["path"]}


@dataclass(frozen=True)
class Corpus:
    """An embedded corpus: its documents as byte-tokenizer ids (each ending in the eod id), and a version that
    changes whenever they would (it names the cached dataset, so a changed corpus is rebuilt, not reused)."""

    documents: Callable[[], Iterator[np.ndarray]]
    version: str


def _text(documents: Callable[[], Iterator[dict]]) -> Corpus:
    """A corpus of text documents ({"text", ...}), byte-tokenized; its version is the Python's."""
    tokenizer = ByteTokenizer()

    def ids() -> Iterator[np.ndarray]:
        for doc in documents():
            yield np.append(tokenizer.encode(doc["text"]), tokenizer.eod)

    return Corpus(ids, f"py{sys.version_info.major}{sys.version_info.minor}")


# the text corpora, as documents {"text", "path"}
TEXTS: dict[str, Callable[[], Iterator[dict]]] = {"stdlib": stdlib_documents, "code": _code, "tests": _tests,
                                                  "docs": _docs}

CORPORA: dict[str, Corpus] = {
    **{name: _text(documents) for name, documents in TEXTS.items()},
    "digits": Corpus(lambda: thinking.documents(think=False), thinking.VERSION),
    "digits-think": Corpus(lambda: thinking.documents(think=True), thinking.VERSION),
}


def embedded_prefix(name: str, cache_dir: str | None = None) -> str:
    """The prefix of the byte-tokenized embedded corpus `name`, built on first use."""
    if name not in CORPORA:
        raise DatasetError(f"{PREFIX}{name}: unknown embedded corpus; "
                           f"choose one of {', '.join(PREFIX + n for n in CORPORA)}")
    cache = cache_dir or default_cache_dir()
    corpus = CORPORA[name]
    prefix = os.path.join(cache, f"{name}-{corpus.version}-byte")
    if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
        # uint16 also holds ids past vocab_size, such as the think ids
        write_indexed_dataset(prefix, corpus.documents(), token_dtype(ByteTokenizer.vocab_size))
    return prefix


def resolve_prefix(prefix: str, cache_dir: str | None = None) -> str:
    """A dataset prefix as given in a config, with `embedded:NAME` replaced by its built path."""
    return embedded_prefix(prefix[len(PREFIX):], cache_dir) if prefix.startswith(PREFIX) else prefix
