"""The training state: a pytree of arrays, nothing else, so it jits, shards and checkpoints as is."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from pufferfish_jax.reducers import Reducer


@struct.dataclass
class TrainState:
    """``params`` are the trainable ``nnx.Param``s; ``rest`` is every other variable (BN statistics,
    dropout RNG counters); ``opt_state`` and ``reducer_state`` belong to the current phase;
    ``carry`` is the task's state across batches (an LSTM's hidden state; ``()`` for most tasks),
    sharded over devices like the batch."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    reducer_state: Any
    carry: Any = ()


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
    """(train graphdef, eval graphdef, params, rest). Train/eval differ only in static flags."""
    model.train()
    train_def, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    return train_def, eval_def, params, rest


def init_state(
    params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation, reducer: Reducer, num_workers: int, step: int = 0,
    carry: Any = (),
) -> TrainState:
    """A fresh optimizer and reducer state for ``params`` (used at the start and at the switch,
    where the official code also creates a new optimizer).

    The reducer's state is per worker (error feedback and momentum are local), so it gets a
    leading axis of ``num_workers`` that the data-parallel step shards over the devices.
    """
    one = reducer.init(params)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        reducer_state=jax.tree.map(lambda x: jnp.broadcast_to(x, (num_workers, *jnp.shape(x))), one),
        carry=carry,
    )


def state_specs(state: TrainState) -> TrainState:
    """Partition specs: everything replicated except the per-worker reducer state and the carry."""
    from jax.sharding import PartitionSpec as P

    from pufferfish_jax.parallel import DATA

    return TrainState(step=P(), params=P(), rest=P(), opt_state=P(), reducer_state=P(DATA), carry=P(DATA))
