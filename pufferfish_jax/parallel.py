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
    the per-worker reducer state and the carry, sharded on their leading axis.

    Every process must hold the same ``state`` (same seed, or the same replicated arrays). With
    several processes each hands over only its own devices' shards: ``device_put`` of host data
    onto a multi-process sharding would first check that all processes agree, an all-gather of
    the whole state (seconds over a slow link, at the start and at the switch).
    """
    from pufferfish_jax.train.state import state_specs

    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state),
                             is_leaf=lambda x: isinstance(x, P))
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)

    def put(sharding: NamedSharding, subtree: Any) -> Any:
        def one(x: Any) -> jax.Array:
            if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global (e.g. the carry)
                return jax.device_put(x, sharding)
            host = np.asarray(x)
            # Fresh copies: the step donates the state's buffers.
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.array(host[idx], copy=True))

        return jax.tree.map(one, subtree)

    return jax.tree.map(put, shardings, state, is_leaf=lambda x: isinstance(x, NamedSharding))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded on ``data`` from this process's rows of the batch."""
    sharding = NamedSharding(mesh, P(DATA))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """``ValueError`` unless every device gets the same number of examples."""
    if batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices")
