"""XLA configuration chosen for speed, applied once before JAX initializes its backends.

On CPU, jaxlib 0.10 hands convolutions, some dots and reductions to YNNPACK by default
(``--xla_cpu_experimental_ynn_fusion_type`` defaults to ``individual_convolution``,
``individual_dot``, ``reduce``). Sending the convolutions back to Eigen is faster for the
ResNet-18 train step here. Measured with ``python -m experiments.bench_step --compare``
(jaxlib 0.10.2, 2-core AMD EPYC shared with other jobs, load average 4–7; one process per
configuration, steps interleaved across them; median paired speedup over the YNNPACK default):

=====================================================  ==================  ==================
configuration (``ynn_fusion_type=`` …)                  width 1, batch 128  width 0.5, batch 64
                                                        vanilla / Puffer.   vanilla / Puffer.
=====================================================  ==================  ==================
default (YNNPACK conv + dot + reduce)                   1.00 / 1.00         1.00 / 1.00
``-individual_convolution`` (**chosen**)                1.28 / 1.17         0.96 / 1.14
``-individual_convolution,-reduce``                     —                   0.91 / 0.98
``-individual_convolution,-individual_dot,-reduce``     —                   0.75 / 0.89
``-individual_convolution`` + ``multi_thread_eigen=0``  —                   0.99 / 0.97
=====================================================  ==================  ==================

(full width: 15.5 s → 12.2 s vanilla, 9.5 s → 8.5 s Pufferfish per step under that load.)
Only the chosen flag was faster for both models at the default width. Not timed: ``+eltwise``
(moves more elementwise work to YNNPACK); ``--xla_cpu_experimental_xnn_graph_fusion_mode``
and ``--xla_cpu_use_onednn`` compile to the identical step in this jaxlib. Verified on
jaxlib 0.10.2 only (the 0.9 lower bound is the original, unverified here).

Unknown XLA flags (and flag values) are fatal, so each flag is guarded by the jaxlib version
that has it, and a user's own ``XLA_FLAGS`` always wins (we only add flags it does not name).
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
    user = {token.split("=", 1)[0] for token in current.split()}
    extra = [f for f in chosen_flags() if f.split("=", 1)[0] not in user]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")


apply()
