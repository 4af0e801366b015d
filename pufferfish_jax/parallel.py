"""The device mesh and how host data becomes global arrays on it.

One ``data`` axis over every device of every process: batches are sharded on it,
parameters and optimizer state are replicated. Each process hands over only its own
rows (:func:`global_batch`), which is what lets a multi-host run read disjoint shards.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def place_state(state: Any, mesh: Mesh) -> Any:
    """Puts a :class:`~pufferfish_jax.train.state.TrainState` on ``mesh``: replicated, except
    the per-worker reducer state, sharded on its leading axis."""
    from pufferfish_jax.train.state import state_specs

    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state),
                             is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(state, shardings)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded on ``data`` from this process's rows of the batch."""
    sharding = NamedSharding(mesh, P(DATA))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """``ValueError`` unless every device gets the same number of examples."""
    if batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices")
