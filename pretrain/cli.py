"""What every command-line entry point prints on bad input: one line, the program and the problem."""

from __future__ import annotations

import sys


def print_error(program: str, err: BaseException) -> None:
    """`program: error: message` on stderr, the message folded onto one line."""
    print(f"{program}: error: {' '.join(str(err).split())}", file=sys.stderr)
