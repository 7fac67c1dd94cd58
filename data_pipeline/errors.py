"""Exceptions of the data pipeline.

Every problem a user can cause with their data or settings raises a subclass of `DataError`
with a message that says what is wrong and what to do; command-line entry points print it as
one ``error: ...`` line and exit with status 2 (see `run_cli`).
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class DataError(Exception):
    """Base class: a problem with the data or the data settings (not a bug)."""


class InputError(DataError):
    """Missing, empty or unreadable input files, or a missing text field."""


class TokenizerError(DataError):
    """A tokenizer that cannot be trained or loaded, or that does not match the data."""


class CorruptDataError(DataError):
    """A prepared folder whose files do not match its own index (truncated shards, bad meta)."""


class DataConfigError(DataError, ValueError):
    """Settings that cannot work together (batch size vs. ranks, sequence length vs. CP size)."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> NoReturn:
    """Run ``main(argv)``; turn a `DataError` into one ``error:`` line on stderr and exit code 2."""
    try:
        main(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
