"""Pure train and eval steps, data-parallel over the mesh's ``data`` axis.

``jax.jit`` + ``jax.shard_map``: each device computes the gradient of its own shard's
mean loss, then the reducer combines them explicitly — so the payload that crosses
the network is exactly the (low-rank) gradient tree. ``check_vma=False`` is
deliberate: with the default ``check_vma=True``, ``jax.grad`` of a replicated parameter
already sums over devices, and an explicit all-reduce on top would be N× too large.
BN statistics are averaged across devices every step; since the running average is
linear in the batch statistics, this equals PyTorch DDP's per-device statistics averaged
before evaluation, and it keeps the state replicated.

A ``carry`` (e.g. an LSTM's hidden state across BPTT chunks) is sharded like the batch:
each device keeps the rows of its own examples.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from pufferfish_jax import runtime
from pufferfish_jax.parallel import DATA
from pufferfish_jax.reducers import Reducer
from pufferfish_jax.train.state import TrainState, state_specs

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class LossFn(Protocol):
    def __call__(self, model: nnx.Module, batch: Batch, carry: Any) -> tuple[jax.Array, Metrics, Any]:
        """Mean loss over the (local) batch, metric *sums* (e.g. ``loss_sum``, ``correct``, ``count``)
        and the carry for the next batch (tasks without one take and return ``()``). Truncated
        backpropagation is the loss function's business: it stops the gradient of the carry it gets."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _per_device_keys(rest: nnx.State) -> nnx.State:
    """``rest`` with this device's index folded into every RNG key (dropout masks must differ
    across devices: their examples differ, the replicated key does not)."""
    index = jax.lax.axis_index(DATA)
    return jax.tree.map(lambda x: jax.random.fold_in(x, index) if _is_key(x) else x, rest)


def _replicated_keys(new: nnx.State, old: nnx.State) -> nnx.State:
    """Puts the replicated keys back (the RNG counters advanced identically on every device)."""
    return jax.tree.map(lambda n, o: o if _is_key(o) else n, new, old)


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

    On CPU meshes the step is compiled with :func:`pufferfish_jax.runtime.train_step_options`.
    JAX accepts ``compiler_options`` only on a top-level ``jax.jit``: to trace the step
    (``jax.make_jaxpr``) or call it inside another ``jit``, use ``step.__wrapped__``, the same
    function without its own compilation.
    """

    def local_step(state: TrainState, batch: Batch, lr: jax.Array) -> tuple[TrainState, Metrics]:
        def compute_loss(params):
            model = nnx.merge(graphdef, params, _per_device_keys(state.rest), copy=True)
            loss, metrics, carry = loss_fn(model, batch, state.carry)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)), carry)

        (_, (metrics, rest, carry)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        rest = _replicated_keys(rest, state.rest)
        mine = jax.tree.map(lambda x: x[0], state.reducer_state)  # this worker's slice
        grads, mine = reducer.reduce(grads, mine, DATA)
        reducer_state = jax.tree.map(lambda x: x[None], mine)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), state.params, updates)
        rest = jax.tree.map(lambda x: jax.lax.pmean(x, DATA) if jnp.issubdtype(x.dtype, jnp.floating) else x, rest)
        new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state,
                                  reducer_state=reducer_state, carry=carry)
        return new_state, jax.lax.psum(metrics, DATA)

    specs = state_specs(None)
    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(DATA), P()), out_specs=(specs, P()), check_vma=False)
    options = runtime.train_step_options(mesh.devices.flat[0].platform)
    return jax.jit(sharded, donate_argnums=0, compiler_options=options)


def make_eval_step(graphdef: nnx.GraphDef, metrics_fn: LossFn, mesh: Mesh
                   ) -> Callable[[nnx.State, nnx.State, Batch, Any], tuple[Metrics, Any]]:
    """``eval(params, rest, batch, carry) -> (metric sums over the global batch, carry)``
    (eval-mode ``graphdef``; the carry is sharded like the batch)."""

    def local_eval(params, rest, batch, carry):
        _, metrics, carry = metrics_fn(nnx.merge(graphdef, params, rest), batch, carry)
        return jax.lax.psum(metrics, DATA), carry

    sharded = jax.shard_map(local_eval, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA)), out_specs=(P(), P(DATA)),
                            check_vma=False)
    return jax.jit(sharded)
