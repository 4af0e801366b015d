"""XLA configuration chosen for speed, applied once before JAX initializes its backends.

On CPU, jaxlib 0.10 sends convolutions to YNNPACK by default, which ran the ResNet-18
train step markedly slower here than Eigen's convolutions (see README, benchmarks).
Unknown XLA flags are fatal, so each flag is guarded by the jaxlib version that has it,
and a user's own ``XLA_FLAGS`` always wins (we only add flags it does not mention).
Set ``PUFFERFISH_NO_XLA_FLAGS=1`` to leave ``XLA_FLAGS`` untouched.
"""

from __future__ import annotations

import os

# (flag, value, minimum jaxlib (major, minor)) — only flags known to exist in those versions.
CPU_FLAGS: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("--xla_cpu_experimental_ynn_fusion_type", "-individual_convolution", (0, 9)),
)


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        from importlib.metadata import version

        major, minor = version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # jaxlib missing or an unparseable dev version: add nothing
        return None


def chosen_flags() -> list[str]:
    """The XLA flags this project adds for the installed jaxlib."""
    installed = _jaxlib_version()
    if installed is None:
        return []
    return [f"{flag}={value}" for flag, value, since in CPU_FLAGS if installed >= since]


def apply() -> str:
    """Adds :func:`chosen_flags` to ``XLA_FLAGS`` (unless the user set them); returns the result."""
    current = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("PUFFERFISH_NO_XLA_FLAGS"):
        return current
    extra = [f for f in chosen_flags() if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")


apply()
