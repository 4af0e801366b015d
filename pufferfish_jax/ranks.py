"""The rank rule: how wide the bottleneck of a factorized layer is, and when factorizing pays.

Pufferfish §3 (and the official code) sets the rank of a layer to
``int(min(c_out, c_in·k·k) / rank_factor)``; we express the same thing as a
``rank_ratio = 1 / rank_factor`` in (0, 1]. A layer is only worth splitting
when the two factors hold fewer parameters than the full matrix, so
``rank_ratio = 1.0`` always leaves the vanilla model.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Sequence


def validate_rank_ratio(rank_ratio: float) -> float:
    """Returns ``rank_ratio`` as a float, or raises ``ValueError`` if it is not in (0, 1]."""
    try:
        value = float(rank_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"rank ratio must be a number in (0, 1], got {rank_ratio!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"rank ratio must be in (0, 1], got {rank_ratio!r}")
    return value


def low_rank(fan_in: int, fan_out: int, rank_ratio: float) -> int | None:
    """The rank to factorize a ``fan_in × fan_out`` matrix at, or None to keep it full rank.

    ``r = int(min(fan_in, fan_out) * rank_ratio)``; the layer is factorized only
    when ``r >= 1`` and ``r·(fan_in + fan_out) < fan_in·fan_out`` (fewer parameters).
    For a conv, ``fan_in = k·k·c_in`` and ``fan_out = c_out``.
    """
    rank_ratio = validate_rank_ratio(rank_ratio)
    rank = int(min(fan_in, fan_out) * rank_ratio)
    if rank >= 1 and rank * (fan_in + fan_out) < fan_in * fan_out:
        return rank
    return None


def path_matches(path: str, patterns: Sequence[str]) -> bool:
    """True when the dotted module ``path`` (e.g. ``layer1.0.conv1``) matches a glob in ``patterns``.

    A pattern also matches everything below the module it names, so ``layer1.0``
    covers ``layer1.0.conv1``.
    """
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def ratio_for(path: str, rank_ratio: float, overrides: Mapping[str, float] | None) -> float:
    """The rank ratio for one module: the first matching override by path glob, else ``rank_ratio``."""
    for pattern, ratio in (overrides or {}).items():
        if path_matches(path, (pattern,)):
            return validate_rank_ratio(ratio)
    return rank_ratio
