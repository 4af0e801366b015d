"""Joining a multi-process run (several hosts, or several processes on one host).

``jax.distributed.initialize`` with explicit coordinator/process numbers, or with no
arguments to let JAX auto-detect TPU pods, SLURM and Open MPI. On CPU the collectives
go through gloo. Simulated devices for testing on one host come from
``jax_num_cpu_devices`` (the XLA host device count).
"""

from __future__ import annotations

import jax


def set_host_devices(count: int) -> None:
    """Splits the CPU into ``count`` XLA devices; must run before JAX initializes its backend."""
    if count < 1:
        raise ValueError(f"--devices must be at least 1, got {count}")
    jax.config.update("jax_num_cpu_devices", count)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    heartbeat_timeout_s: int | None = None,
) -> bool:
    """Joins the run; returns True when running multi-process.

    Explicit ``coordinator`` ("host:port"), ``num_processes`` and ``process_id``, or ``auto``
    for JAX's cluster auto-detection (TPU pod slices, SLURM, Open MPI). Neither: single process.
    """
    if coordinator is None and not auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1
