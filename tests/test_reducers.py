"""Reducers: exact all-reduce, PowerSGD and Signum, on simulated workers.

Workers are simulated in-process with ``jax.vmap(..., axis_name=...)`` (``pmean``/``psum``
work under it exactly as across devices); one subprocess checks the same reducers inside a
real ``jax.shard_map`` over 4 CPU devices, and through the project's train step.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pufferfish_jax.reducers import (PowerSGDState, SignumState, all_reduce, get_reducer, powersgd,
                                     signum)
from tests.conftest import REPO

AXIS = "workers"

# View as matrices: conv HWIO (3,3,4,8) -> (36, 8); dense (16, 6); tall (20, 3); wide (4, 10).
SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 6), "bias": (6,), "tall": (20, 3), "wide": (4, 10)}


RANK_ONE = powersgd(rank=1)  # one instance, so tests share its compiled simulation
FULL_RANK = powersgd(rank=10, min_compression_rate=0.0)  # forces the power iteration on every matrix


def params_like() -> dict[str, jax.Array]:
    return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def worker_grads(workers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Different random gradients per worker, stacked on a leading worker axis."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((workers, *s)).astype(np.float32) for k, s in SHAPES.items()}


def stacked_init(reducer, params, workers: int):
    """As ``train.state.init_state``: one ``init``, broadcast to every worker."""
    one = reducer.init(params)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (workers, *jnp.shape(x))), one)


@functools.lru_cache(maxsize=None)
def _simulator(reducer):
    return jax.jit(jax.vmap(lambda g, s: reducer.reduce(g, s, AXIS), axis_name=AXIS))


def simulate(reducer, grads, state):
    """One ``reduce`` on every worker at once: leading axis of ``grads`` and ``state`` = worker."""
    return _simulator(reducer)(grads, state)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def as_matrix(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).reshape(-1, x.shape[-1])


def reference_step(grads_w: list[np.ndarray], errors_w: list[np.ndarray], query: np.ndarray):
    """PowerSGD on one leaf in float64 numpy: (approximation, errors per worker, new Q)."""
    m = [as_matrix(g).astype(np.float64) + as_matrix(e) for g, e in zip(grads_w, errors_w)]
    p = np.mean([mi @ query for mi in m], axis=0)
    p, _ = np.linalg.qr(p)
    q = np.mean([mi.T @ p for mi in m], axis=0)
    approx = p @ q.T
    return approx, [mi - approx for mi in m], q


# ---------------------------------------------------------------------------------- all-reduce


def test_all_reduce_is_the_mean():
    grads = worker_grads(3)
    out, _ = simulate(all_reduce(), grads, stacked_init(all_reduce(), params_like(), 3))
    for k in SHAPES:
        for w in range(3):
            close(out[k][w], grads[k].mean(0))


# ------------------------------------------------------------------------------------ PowerSGD


def test_powersgd_full_rank_equals_the_exact_mean():
    reducer = FULL_RANK
    state = stacked_init(reducer, params_like(), 3)
    leaves = jax.tree.leaves(params_like())  # sorted: bias, conv, dense, tall, wide
    assert [None if q is None else q.shape[1:] for q in state.query] == [None, (8, 8), (6, 6), (3, 3), (10, 4)]
    grads = worker_grads(3)
    out, new = simulate(reducer, grads, state)
    for k in SHAPES:
        for w in range(3):
            close(out[k][w], grads[k].mean(0), tol=2e-5)
    assert len(new.query) == len(leaves)
    # With the default rate, these ranks are not worth compressing: all sent as is, also exact.
    assert all(q is None for q in powersgd(rank=10).init(params_like()).query)


def test_powersgd_matches_reference_and_error_feedback_accounts_for_everything():
    reducer = RANK_ONE
    state0 = stacked_init(reducer, params_like(), 3)
    grads = worker_grads(3, seed=1)
    out1, state1 = simulate(reducer, grads, state0)
    out2, state2 = simulate(reducer, grads, state1)  # same gradient again
    names = sorted(SHAPES)  # leaf order of the dict
    for i, k in enumerate(names):
        if k == "bias":
            assert state1.query[i] is None and state1.error[i] is None
            close(out1[k][0], grads[k].mean(0))
            continue
        g = [grads[k][w] for w in range(3)]
        # Step 1 against the numpy reference (e = 0, Q = the shared seeded Q0).
        q0 = np.asarray(state0.query[i][0], np.float64)
        approx, errors, q1 = reference_step(g, [np.zeros_like(x) for x in g], q0)
        for w in range(3):
            close(as_matrix(out1[k][w]), approx, tol=1e-4)
            close(as_matrix(state1.error[i][w]), errors[w], tol=1e-4)
            # e = M − P Qᵀ locally, so the output plus the residual is this worker's gradient.
            close(out1[k][w] + state1.error[i][w], g[w])
        # Q is all-reduced: the same on every worker (equal to the reference up to column signs).
        close(state1.query[i][0], state1.query[i][2])
        close(np.abs(state1.query[i][0]), np.abs(q1), tol=1e-4)
        # Step 2 starts from e1 and Q1; telescoping: out1 + out2 + e2 = 2 G on every worker.
        approx2, errors2, _ = reference_step(g, [np.asarray(state1.error[i][w], np.float64) for w in range(3)],
                                             np.asarray(state1.query[i][0], np.float64))
        for w in range(3):
            close(as_matrix(out2[k][w]), approx2, tol=1e-4)
            close(out1[k][w] + out2[k][w] + state2.error[i][w], 2 * g[w], tol=2e-5)


def test_powersgd_warm_starts_q():
    reducer = RANK_ONE
    state0 = stacked_init(reducer, params_like(), 3)
    grads = worker_grads(3, seed=2)
    _, state1 = simulate(reducer, grads, state0)
    i = sorted(SHAPES).index("dense")
    assert not np.allclose(state1.query[i], state0.query[i])
    # Step 2 from state1 depends on its Q: replacing it by the initial Q changes the output,
    # and the output from state1 is the reference computed with Q1.
    out_warm, _ = simulate(reducer, grads, state1)
    out_cold, _ = simulate(reducer, grads, state1._replace(query=state0.query))
    assert not np.allclose(out_warm["dense"], out_cold["dense"], atol=1e-3)
    g = [grads["dense"][w] for w in range(3)]
    approx, _, _ = reference_step(g, [np.asarray(state1.error[i][w], np.float64) for w in range(3)],
                                  np.asarray(state1.query[i][0], np.float64))
    close(out_warm["dense"][0], approx, tol=1e-4)


def test_powersgd_rank_one_recovers_a_rank_one_gradient():
    rng = np.random.default_rng(3)
    rank_one = {}
    for k, s in SHAPES.items():
        if len(s) < 2:
            rank_one[k] = rng.standard_normal(s).astype(np.float32)
        else:
            u, v = rng.standard_normal(int(np.prod(s[:-1]))), rng.standard_normal(s[-1])
            rank_one[k] = np.outer(u, v).reshape(s).astype(np.float32)
    grads = {k: np.broadcast_to(x, (3, *x.shape)) for k, x in rank_one.items()}  # same on all workers
    reducer = RANK_ONE
    out, state = simulate(reducer, grads, stacked_init(reducer, params_like(), 3))
    for i, k in enumerate(sorted(SHAPES)):
        close(out[k][1], rank_one[k], tol=1e-4)
        if state.error[i] is not None:
            assert float(jnp.max(jnp.abs(state.error[i]))) < 1e-4


def test_powersgd_state_and_arguments():
    state = powersgd(rank=1, seed=0).init(params_like())
    assert isinstance(state, PowerSGDState)
    again, other = powersgd(rank=1, seed=0).init(params_like()), powersgd(rank=1, seed=1).init(params_like())
    close(state.query[1], again.query[1])
    assert not np.allclose(state.query[1], other.query[1])
    assert all(e is None or (not e.any()) for e in state.error)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rank"):
            powersgd(rank=bad)
    with pytest.raises(ValueError, match="min_compression_rate"):
        powersgd(min_compression_rate=-1.0)


# -------------------------------------------------------------------------------------- Signum


def vote(grads: np.ndarray, momentum: float = 0.0, state: np.ndarray | None = None):
    reducer = signum(momentum)
    m = np.zeros_like(grads) if state is None else state
    out, new = simulate(reducer, {"w": jnp.asarray(grads)}, SignumState({"w": jnp.asarray(m)}))
    return np.asarray(out["w"]), np.asarray(new.momentum["w"])


def test_signum_majority_vote():
    # Columns: (+,+,−) → +; (−,−,+) → −; (+,+,+) → +; (+,−,0) → + (one bit: 0 is sent as +).
    three = np.array([[0.5, -2.0, 1.0, 3.0], [4.0, -0.1, 2.0, -1.0], [-9.0, 7.0, 3.0, 0.0]], np.float32)
    out, _ = vote(three)
    for w in range(3):
        np.testing.assert_array_equal(out[w], [1.0, -1.0, 1.0, 1.0])
    out, _ = vote(np.array([[2.0, -1.0], [-5.0, -3.0]], np.float32))  # two workers: (+,−) ties → 0; (−,−) → −
    np.testing.assert_array_equal(out, [[0.0, -1.0], [0.0, -1.0]])
    # More entries than one byte holds, not a multiple of 8: the packing pads and unpacks exactly.
    rng = np.random.default_rng(0)
    many = rng.standard_normal((3, 21)).astype(np.float32)
    out, _ = vote(many)
    np.testing.assert_array_equal(out[1], np.sign(np.sign(many).sum(0)))


def test_signum_momentum():
    beta = 0.9
    m0 = np.array([[1.0, 1.0, -2.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.5]], np.float32)
    g = np.array([[-5.0, -10.0, 1.0], [-5.0, -10.0, 3.0], [-5.0, -10.0, -4.0]], np.float32)
    out, m1 = vote(g, beta, m0)
    close(m1, beta * m0 + (1 - beta) * g)  # 0.4, -0.1, ...
    expected = np.sign(np.where(beta * m0 + (1 - beta) * g >= 0, 1, -1).sum(0))
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[0][:2], [1.0, -1.0])  # momentum outvotes the gradient's sign in col 0
    assert isinstance(signum().init(params_like()), SignumState)
    with pytest.raises(ValueError, match="momentum"):
        signum(momentum=1.0)


# ------------------------------------------------------------------------- bytes and registry


def test_bytes_per_step_from_shapes():
    params = params_like()  # sizes: conv 288, dense 96, bias 6, tall 60, wide 40 → 490
    assert all_reduce().bytes_per_step(params) == 4 * 490
    # rank 1: r(n+m) = conv 44, dense 22, tall 23, wide 14, bias sent as is 6 → 109 floats.
    assert powersgd(rank=1).bytes_per_step(params) == 4 * 109
    # rank 2: 88 + 44 + 46 + 28 + 6 = 212.
    assert powersgd(rank=2).bytes_per_step(params) == 4 * 212
    # rank 3: tall 3·23 = 69 ≥ 60 and wide 3·14 = 42 ≥ 40 go uncompressed: 132 + 66 + 60 + 40 + 6.
    assert powersgd(rank=3).bytes_per_step(params) == 4 * 304
    # 1 bit per entry, all tensors in one buffer rounded up to bytes: ceil(490 / 8).
    assert signum().bytes_per_step(params) == 62
    assert signum().bytes_per_step({"a": jnp.zeros((3,)), "b": jnp.zeros((5,))}) == 1  # not 1 + 1 bytes per tensor


def test_get_reducer():
    assert {n: get_reducer(n).name for n in ("allreduce", "powersgd", "signum")} == {
        "allreduce": "allreduce", "powersgd": "powersgd", "signum": "signum"}
    assert get_reducer("powersgd", rank=3).bytes_per_step(params_like()) == 4 * 304
    with pytest.raises(ValueError, match="allreduce.*powersgd.*signum"):
        get_reducer("topk")


# ------------------------------------------------------------------ real shard_map, 4 devices


def check_shard_map() -> None:
    """Run in a subprocess with 4 CPU devices: the reducers inside ``shard_map`` (as in
    ``train/steps.py``) against the numpy reference, and through the project's train step."""
    import optax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from pufferfish_jax.parallel import DATA, data_mesh, global_batch, place_state
    from pufferfish_jax.train.state import init_state, split_model
    from pufferfish_jax.train.steps import make_train_step

    assert jax.device_count() == 4
    mesh = data_mesh()
    grads = worker_grads(4, seed=5)

    def sharded(reducer):
        def local(g, s):
            mine = jax.tree.map(lambda x: x[0], s)  # this worker's slice, as in train/steps.py
            out, mine = reducer.reduce(jax.tree.map(lambda x: x[0], g), mine, DATA)
            return jax.tree.map(lambda x: x[None], (out, mine))

        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P(DATA)), out_specs=P(DATA), check_vma=False))

    # PowerSGD, two steps, against the float64 reference on every leaf and device.
    reducer = powersgd(rank=2)
    step = sharded(reducer)
    state = stacked_init(reducer, params_like(), 4)
    errors = {k: [np.zeros(as_matrix(grads[k][0]).shape)] * 4 for k in SHAPES}
    for _ in range(2):
        queries = state.query
        out, state = step(grads, state)
        for i, k in enumerate(sorted(SHAPES)):
            g = [grads[k][w] for w in range(4)]
            if queries[i] is None:
                expected = grads[k].mean(0)
            else:
                expected, errors[k], _ = reference_step(g, errors[k], np.asarray(queries[i][0], np.float64))
                close(state.query[i][0], state.query[i][3])
                for w in range(4):
                    close(as_matrix(state.error[i][w]), errors[k][w], tol=1e-4)
            for w in range(4):
                close(np.asarray(out[k][w]).reshape(expected.shape), expected, tol=1e-4)

    # Signum with momentum, against numpy.
    beta = 0.5
    out, state = sharded(signum(beta))(grads, stacked_init(signum(beta), params_like(), 4))
    for k in SHAPES:
        m = (1 - beta) * grads[k]
        close(state.momentum[k], m)
        for w in range(4):
            np.testing.assert_array_equal(out[k][w], np.sign(np.where(m >= 0, 1, -1).sum(0)))

    # Through the project's train step: full-rank PowerSGD trains exactly like the all-reduce.
    def loss_fn(model, batch, carry):
        logits = model(batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"loss_sum": loss * batch["y"].shape[0]}, carry

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((8, 6)).astype(np.float32), "y": rng.integers(0, 3, 8).astype(np.int32)}
    finals = []
    for reducer in (all_reduce(), powersgd(rank=8, min_compression_rate=0.0)):
        model = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
        train_def, _, params, rest = split_model(model)
        tx = optax.identity()
        train_step = make_train_step(train_def, loss_fn, tx, reducer, mesh)
        state = place_state(init_state(params, rest, tx, reducer, mesh.size), mesh)
        for _ in range(2):
            state, _ = train_step(state, global_batch(data, mesh), np.float32(0.1))
        finals.append(jax.tree.map(np.asarray, state.params))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(finals[-1]))
    exact, full_rank = finals
    jax.tree.map(lambda x, y: close(x, y, tol=1e-5), exact, full_rank)
    print("shard_map reducers OK")


def test_reducers_inside_shard_map_on_four_devices():
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", "from tests.test_reducers import check_shard_map; check_shard_map()"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "shard_map reducers OK" in proc.stdout


def test_flat_all_reduce_equals_tree_all_reduce():
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pufferfish_jax.reducers import all_reduce

    grads = {"w": jnp.arange(24.0).reshape(3, 2, 4), "b": jnp.arange(5.0)}
    stacked = jax.tree.map(lambda g: jnp.stack([g, 2 * g, -g]), grads)  # 3 simulated workers
    run = lambda r: jax.vmap(functools.partial(r.reduce, state=(), axis_name="w"), axis_name="w")(stacked)[0]
    tree, flat = run(all_reduce(flat=False)), run(all_reduce())
    for k in grads:
        np.testing.assert_allclose(flat[k], tree[k], rtol=1e-6)
        np.testing.assert_allclose(tree[k][0], (2 / 3) * grads[k], rtol=1e-6)
    assert all_reduce(flat=True).bytes_per_step(grads) == 4 * 29
