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

**The train step gets one more option, for its own program only.** XLA:CPU computes a conv's
kernel gradient from its input transposed to ``[C, H, W, N]``, and it fuses the BN/ReLU/residual
ops that produce that input into the transposing fusion, which then re-reads several
activations in strided order: in the full-width ResNet-18 step these fusions took ~0.9 s of
3.1 s (vanilla) and ~1.1 s of 2.1 s (Pufferfish), the largest single cost left after the
convolutions (trace in ``experiments/bench_step.py --trace``). Letting YNNPACK also take the
elementwise fusions (``LIBRARY_FUSION_TYPE_ELTWISE``) makes those transposes cheap: vanilla
1.10×, Pufferfish 1.27× faster, the Pufferfish/vanilla step ratio 1.47× → 1.72×
(``bench_step --compare``, idle host, width 1; at width 0.25 1.12×/1.06×, at width 0.125
0.96×/0.91×). It is not a global flag because with it jaxlib 0.10 fails *at run time* on some
other programs ("Instruction with unsupported layout in YNN fusion", e.g. an elementwise op
after ``jnp.linalg.eigh``, which the SVD switch uses); the train steps of all the project's
models run with it in the test suite. It is passed as ``jax.jit(..., compiler_options=...)``
(see :func:`train_step_options`), only for CPU meshes, only on the jaxlib minor versions it
was verified on, not when the user's own ``XLA_FLAGS`` name the YNN flag, and not under
``PUFFERFISH_NO_XLA_FLAGS``.

**LAPACK keeps to one thread while the SVD switch runs.** jaxlib's LAPACK is OpenBLAS, which
by default splits each call over all cores and makes its threads wait for each other by
spinning. In the switch's compiled call XLA runs the eigendecompositions on one of its own
threads while its other thread computes the next layers' Gram matrices, so the 2 cores are
oversubscribed and a spinning OpenBLAS thread waits on a preempted one: in a trace of the
ResNet-18 switch the first 512×512 ``eigh`` took 69 ms, against 17.6 ms on one thread (16.5 ms
on two, alone). :func:`single_threaded_blas` gives each call one thread for the duration;
``factorize`` of a ResNet-18 went 0.224–0.240 s → 0.175–0.177 s (two A/B runs, medians of 9
models each, interleaved, idle host).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# (flag, value, minimum jaxlib (major, minor)) — only flags known to exist in those versions.
CPU_FLAGS: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("--xla_cpu_experimental_ynn_fusion_type", "-individual_convolution", (0, 9)),
)


# Per-program options of the train step: (option, value, jaxlib (major, minor) verified on).
# The value overwrites the YNN list, so it is the global choice above plus elementwise fusions.
TRAIN_STEP_CPU_OPTIONS: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...] = (
    ("xla_cpu_experimental_ynn_fusion_type",
     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE", ((0, 10),)),
)

_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # before apply() adds ours


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


def train_step_options(platform: str) -> dict[str, str] | None:
    """``compiler_options`` for the jitted train step on devices of ``platform`` (None: none)."""
    installed = _jaxlib_version()
    if platform != "cpu" or installed is None or os.environ.get("PUFFERFISH_NO_XLA_FLAGS"):
        return None
    user = {token.split("=", 1)[0].lstrip("-") for token in _USER_XLA_FLAGS.split()}
    options = {name: value for name, value, verified in TRAIN_STEP_CPU_OPTIONS
               if installed in verified and name not in user}
    return options or None


@contextlib.contextmanager
def single_threaded_blas(platform: str) -> Iterator[None]:
    """Within the block, each BLAS/LAPACK call in this process uses one thread (on ``"cpu"`` only).

    For a compiled program that runs LAPACK calls beside XLA's own multi-threaded work (see the
    module docstring); the previous thread counts come back on exit. The program must have
    *finished* inside the block (``jax.block_until_ready``), since dispatch is asynchronous.
    Libraries are looked up on entry (~1 ms), so a BLAS loaded later inside the block is not limited.
    """
    if platform != "cpu":
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


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
