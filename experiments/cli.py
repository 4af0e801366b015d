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


def check_out_dir(path: str, resume: bool = True) -> bool:
    """The output directory must be creatable and writable. Returns True when it holds
    checkpoints to continue from; a run there without checkpoints, or checkpoints with
    ``resume=False``, is refused (never silently overwritten or started over)."""
    from pufferfish_jax.checkpoint import checkpoint_dir, committed_steps

    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {path} is not writable")
    if committed_steps(checkpoint_dir(path)):
        if not resume:
            raise UsageError(f"output directory {path} holds checkpoints of a run and --no-resume forbids continuing it; "
                             "choose another --out-dir")
        return True
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        raise UsageError(f"output directory {path} already holds a run without a usable checkpoint; choose another --out-dir")
    return False


def check_resumable(path: str, identity: dict, epochs: int) -> None:
    """The newest checkpoint in ``path`` must be readable, belong to a run like this one
    (:func:`pufferfish_jax.train.trainer.run_identity`) and not be past ``epochs``. Reads metadata only."""
    from pufferfish_jax.checkpoint import checkpoint_dir, identity_mismatch, latest_meta

    found = latest_meta(checkpoint_dir(path))
    if found is None:
        raise UsageError(f"output directory {path} holds checkpoints but none is readable; move it away to start over")
    _, meta = found
    why = identity_mismatch(meta["identity"], identity)
    if why:
        raise UsageError(f"output directory {path} holds checkpoints of another run ({why}); "
                         "resume it with the same settings or choose another --out-dir")
    if meta["epoch"] > epochs:
        raise UsageError(f"output directory {path} holds a checkpoint from epoch {meta['epoch']}, past --epochs {epochs}")
