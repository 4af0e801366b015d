"""Gradient reducers: how data-parallel workers combine their gradients.

Each reducer is a small pair of pure functions in the style of optax — ``init(params)``
gives its state, ``reduce(grads, state, axis_name)`` runs inside ``shard_map`` and returns
the combined gradients and the new state — plus ``bytes_per_step(params)``, the payload
one worker sends per step computed from shapes. The trainer never branches on which one it has.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class Reducer(NamedTuple):
    """``init(params) -> state``; ``reduce(grads, state, axis_name) -> (grads, state)``;
    ``bytes_per_step(params) -> int``; ``name``."""

    name: str
    init: Callable[[PyTree], PyTree]
    reduce: Callable[[PyTree, PyTree, str], tuple[PyTree, PyTree]]
    bytes_per_step: Callable[[PyTree], int]


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in ``tree``."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def all_reduce() -> Reducer:
    """Exact mean of the gradients across workers: one all-reduce of the whole gradient tree
    (the Pufferfish payload is simply this tree, made small by the factorization)."""

    def reduce(grads: PyTree, state: PyTree, axis_name: str) -> tuple[PyTree, PyTree]:
        return jax.lax.pmean(grads, axis_name), state

    return Reducer("allreduce", lambda params: (), reduce, tree_bytes)
