"""What every command-line entry point prints on bad input: one line, the program and the problem."""

from __future__ import annotations

import sys


def one_line(err: BaseException) -> str:
    """The error's message folded onto one line."""
    return " ".join(str(err).split())


def print_error(program: str, err: BaseException) -> None:
    """`program: error: message` on stderr, the message folded onto one line."""
    print(f"{program}: error: {one_line(err)}", file=sys.stderr)
