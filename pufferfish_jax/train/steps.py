"""Pure train and eval steps, data-parallel over the mesh's ``data`` axis.

``jax.jit`` + ``jax.shard_map``: each device computes the gradient of its own shard's
mean loss, then the reducer combines them explicitly — so the payload that crosses
the network is exactly the (low-rank) gradient tree. ``check_vma=False`` is
deliberate: with the default ``check_vma=True``, ``jax.grad`` of a replicated parameter
already sums over devices, and an explicit all-reduce on top would be N× too large.
BN statistics are averaged across devices every step; since the running average is
linear in the batch statistics, this equals PyTorch DDP's per-device statistics averaged
before evaluation, and it keeps the state replicated.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from pufferfish_jax.parallel import DATA
from pufferfish_jax.reducers import Reducer
from pufferfish_jax.train.state import TrainState, state_specs

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class LossFn(Protocol):
    def __call__(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, Metrics]:
        """Mean loss over the (local) batch, and metric *sums* (e.g. ``loss_sum``, ``correct``, ``count``)."""


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    reducer: Reducer,
    mesh: Mesh,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``step(state, batch, lr) -> (state, metric sums over the global batch)``.

    ``tx`` maps gradients to a descent direction without the learning rate (e.g. weight
    decay + momentum); ``lr`` is a traced argument, so schedules never recompile.
    Compiles once per ``graphdef`` (once per phase).
    """

    def local_step(state: TrainState, batch: Batch, lr: jax.Array) -> tuple[TrainState, Metrics]:
        def compute_loss(params):
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            loss, metrics = loss_fn(model, batch)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

        (_, (metrics, rest)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        mine = jax.tree.map(lambda x: x[0], state.reducer_state)  # this worker's slice
        grads, mine = reducer.reduce(grads, mine, DATA)
        reducer_state = jax.tree.map(lambda x: x[None], mine)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), state.params, updates)
        rest = jax.tree.map(lambda x: jax.lax.pmean(x, DATA) if jnp.issubdtype(x.dtype, jnp.floating) else x, rest)
        new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state,
                                  reducer_state=reducer_state)
        return new_state, jax.lax.psum(metrics, DATA)

    specs = state_specs(None)
    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(DATA), P()), out_specs=(specs, P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, metrics_fn: LossFn, mesh: Mesh) -> Callable[[nnx.State, nnx.State, Batch], Metrics]:
    """``eval(params, rest, batch) -> metric sums`` over the global batch (eval-mode ``graphdef``)."""

    def local_eval(params, rest, batch):
        _, metrics = metrics_fn(nnx.merge(graphdef, params, rest), batch)
        return jax.lax.psum(metrics, DATA)

    sharded = jax.shard_map(local_eval, mesh=mesh, in_specs=(P(), P(), P(DATA)), out_specs=P(), check_vma=False)
    return jax.jit(sharded)
