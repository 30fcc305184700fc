"""The embedded default corpus: the running Python's standard library, as real text every machine has.

Built once into a cache folder: the `.py` files of the standard library (sorted, so the
corpus is the same on every run) become JSON Lines, then a byte-tokenized Megatron
indexed dataset. Later runs find the `.idx` and reuse it.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from data.indexed import token_dtype, write_indexed_dataset
from data.tokenizers import ByteTokenizer


def default_cache_dir() -> str:
    return os.environ.get("FOLDTRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "foldtron")


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


def embedded_corpus(cache_dir: str | None = None) -> str:
    """Return the prefix of the byte-tokenized standard-library corpus, building it on first use."""
    cache = cache_dir or default_cache_dir()
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte"
    prefix = os.path.join(cache, name)
    if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
        return prefix
    os.makedirs(cache, exist_ok=True)
    jsonl = prefix + ".jsonl"
    tmp = f"{jsonl}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            f.write(json.dumps(doc) + "\n")
    os.replace(tmp, jsonl)
    tokenizer = ByteTokenizer()

    def documents():
        with open(jsonl, encoding="utf-8") as f:
            for line in f:
                ids = tokenizer.encode(json.loads(line)["text"])
                yield np.append(ids, tokenizer.eod)

    write_indexed_dataset(prefix, documents(), token_dtype(tokenizer.vocab_size))
    return prefix
