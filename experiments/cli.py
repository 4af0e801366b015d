"""What every experiment's command line shares: user errors as one sentence and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn


class UsageError(Exception):
    """A problem with the user's input; reported as one sentence, exit code 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one sentence (no usage dump) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def rank_ratio_arg(text: str) -> float:
    """argparse type for ``--ranks``: a number in (0, 1]."""
    from pufferfish_jax.ranks import validate_rank_ratio

    try:
        return validate_rank_ratio(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_out_dir(path: str) -> None:
    """The output directory must be creatable and writable, and must not already hold a run."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {path} is not writable")
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        raise UsageError(f"output directory {path} already holds a run; choose another --out-dir")
