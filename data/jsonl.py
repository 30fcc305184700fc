"""JSON Lines inputs: a file, a directory or a glob of plain, `.gz` or `.zst` files, read as a stream.

Files are never loaded whole: the preprocessing tools must run in flat memory on corpora
far larger than RAM. Lines come back raw (bytes), with their file and 1-based line number,
so that a bad line can be reported where it is and parsing can happen in worker processes.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import IO, Iterator

import zstandard

from parallel.errors import FoldtronError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")


class InputError(FoldtronError, ValueError):
    """An input that cannot be read at all (no files, no lines); the message says which."""


def expand_inputs(spec: str) -> list[str]:
    """The files `spec` names: itself, every JSON Lines file under a directory (recursively), or a glob's matches.

    Sorted, so the order of documents, and hence the output, does not depend on the file system.
    """
    if os.path.isdir(spec):
        files = [
            os.path.join(root, name)
            for root, _, names in os.walk(spec)
            for name in names
            if name.endswith(SUFFIXES)
        ]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = [path for path in glob.glob(spec, recursive=True) if os.path.isfile(path)]
    if not files:
        raise InputError(f"input {spec!r}: no such file, or no {', '.join(SUFFIXES)} files in it")
    return sorted(files)


def open_binary(path: str) -> IO[bytes]:
    """`path` opened for streaming reads, decompressed on the fly when it ends in .gz or .zst."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        raw = open(path, "rb")
        # max_window_size: zstd --long / -19 files use windows beyond the default limit
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(raw, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def iter_lines(files: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """(file, line number, raw line without its newline) for every line of `files`, in order.

    Blank lines are skipped but still counted, so line numbers match an editor's.
    Raises InputError when the files hold no lines at all.
    """
    any_line = False
    for path in files:
        number = 0
        try:
            with open_binary(path) as f:
                for number, line in enumerate(f, start=1):
                    line = line.rstrip(b"\r\n")
                    if line.strip():
                        any_line = True
                        yield path, number, line
        except (OSError, EOFError, zstandard.ZstdError) as e:  # unreadable, truncated or corrupt
            raise InputError(f"{path}: cannot read past line {number} ({e})") from e
    if not any_line:
        more = f" and {len(files) - 1} more files" if len(files) > 1 else ""
        raise InputError(f"input {files[0]}{more}: empty, no lines to read")


def parse_document(line: bytes, key: str) -> tuple[str | None, str | None]:
    """(text, None) for a good line, (None, why it is bad) otherwise; a bad line is never an exception."""
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"invalid JSON ({e.__class__.__name__}: {e})"
    if not isinstance(doc, dict):
        return None, f"not a JSON object but {type(doc).__name__}"
    if key not in doc:
        return None, f"no key {key!r}"
    if not isinstance(doc[key], str):
        return None, f"{key!r} is {type(doc[key]).__name__}, not a string"
    try:
        doc[key].encode("utf-8")  # cheap next to parsing; tokenizers fail on unpaired \ud800-style escapes
    except UnicodeEncodeError:
        return None, f"{key!r} holds an unpaired surrogate escape, not valid Unicode text"
    return doc[key], None
