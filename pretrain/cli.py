"""What every command-line entry point catches and prints on bad input: one line, the program and the problem."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from parallel.errors import FoldtronError

# Bad input (every foldtron error) and the operating system's word on a file; anything else is a bug.
USER_ERRORS = (FoldtronError, OSError)


def one_line(err: BaseException) -> str:
    """The error's message folded onto one line."""
    return " ".join(str(err).split())


class UsageError(FoldtronError):
    """Bad command-line arguments (argparse would exit; this lets main() print the usage)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)


def config_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    """One config path and its `section.key=value` overrides from positional arguments."""
    paths = [a for a in args if "=" not in a]
    if len(paths) != 1:
        raise UsageError(f"expected one config file, got {paths or 'none'}")
    return paths[0], [a for a in args if "=" in a]


def parse_command(argv: list[str], parse, *, program: str, usage: str):
    """`parse(argv)`, or the exit status when there is nothing to run: 0 after printing the usage for -h/--help,
    2 after a one-line usage error."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    try:
        return parse(argv)
    except UsageError as err:
        print(f"{program}: error: {err}\n{usage}", file=sys.stderr)
        return 2


def run_tool(program: str, work: Callable[[int, int], None]) -> int:
    """A tool's main once its arguments are parsed: `work(world_size, rank)` (several ranks under torchrun); bad
    input ends as one line, printed once over the ranks, and exit status 1; the process group `work` may have
    started is ended either way. Returns the exit status."""
    from pretrain import distributed
    from pretrain.__main__ import report

    world_size, rank = distributed.world_from_env()
    try:
        work(world_size, rank)
    except USER_ERRORS as err:
        report(err, world_size, rank, program=program)
        return 1
    finally:
        distributed.shutdown()
    return 0


def print_error(program: str, err: BaseException) -> None:
    """`program: error: message` on stderr, the message folded onto one line."""
    print(f"{program}: error: {one_line(err)}", file=sys.stderr)
