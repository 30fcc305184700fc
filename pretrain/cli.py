"""What every command-line entry point catches and prints on bad input: one line, the program and the problem."""

from __future__ import annotations

import sys

from parallel.errors import FoldtronError

# Bad input (every foldtron error) and the operating system's word on a file; anything else is a bug.
USER_ERRORS = (FoldtronError, OSError)


def one_line(err: BaseException) -> str:
    """The error's message folded onto one line."""
    return " ".join(str(err).split())


def print_error(program: str, err: BaseException) -> None:
    """`program: error: message` on stderr, the message folded onto one line."""
    print(f"{program}: error: {one_line(err)}", file=sys.stderr)
