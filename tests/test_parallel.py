"""Data parallelism: N simulated devices must train exactly like one device on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _train(devices, model_kind: str, steps: int, npz: str):
    """K steps of the project's train step on a mesh of ``devices``; returns params as numpy."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from pufferfish_jax import factorize
    from pufferfish_jax.data.cifar import load_npz, train_batches
    from pufferfish_jax.models import cifar_resnet
    from pufferfish_jax.parallel import data_mesh, global_batch, place_state
    from pufferfish_jax.reducers import all_reduce
    from pufferfish_jax.train.state import init_state, split_model
    from pufferfish_jax.train.steps import make_train_step
    from pufferfish_jax.train.tasks import image_classification

    mesh = data_mesh(devices)
    model = cifar_resnet.resnet18(width=0.0625, rngs=nnx.Rngs(0))
    if model_kind == "pufferfish":
        factorize(model, 0.25, cifar_resnet.KEEP_FULL_RANK)
    # BN in inference form: per-device batch statistics (PyTorch DDP semantics) legitimately differ
    # from full-batch ones, so the exact comparison of the gradient all-reduce freezes them.
    _, frozen_bn_def, params, rest = split_model(model)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(decay=0.9))
    reducer = all_reduce()
    step = make_train_step(frozen_bn_def, image_classification(), tx, reducer, mesh)
    state = place_state(init_state(params, rest, tx, reducer, mesh.size), mesh)
    train, _ = load_npz(npz)
    # Each process reads only its own rows of every global batch.
    data = train_batches(train, 32, seed=0, epoch=0, shard_index=jax.process_index(), shard_count=jax.process_count())
    for i in range(steps):
        assert len(data[i]["label"]) == 32 // jax.process_count()
        state, _ = step(state, global_batch(data[i], mesh), np.float32(0.1))
    jax.block_until_ready(state)
    # Replicated arrays: every process holds a full copy on its addressable devices.
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), (state.params, state.rest))


def check_equivalence(model_kind: str, npz: str) -> None:
    import jax
    import numpy as np

    assert jax.device_count() == 8
    one = _train(jax.devices()[:1], model_kind, 3, npz)
    eight = _train(jax.devices(), model_kind, 3, npz)
    flat_one, flat_eight = jax.tree.leaves(one), jax.tree.leaves(eight)
    assert len(flat_one) == len(flat_eight)
    worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(flat_one, flat_eight))
    print("max relative difference", worst)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("model_kind", ["vanilla", "pufferfish"])
def test_eight_devices_equal_one_device(model_kind, cifar_npz):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    code = f"from tests.test_parallel import check_equivalence; check_equivalence({model_kind!r}, {str(cifar_npz)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def multiprocess_worker(process_id: int, port: int, npz: str, out: str) -> None:
    import jax
    import numpy as np

    from pufferfish_jax.distributed import initialize

    assert initialize(f"127.0.0.1:{port}", 2, process_id)
    params = _train(jax.devices(), "pufferfish", 3, npz)
    np.savez(out, *jax.tree.leaves(params))


def test_two_processes_equal_one_process(tmp_path, cifar_npz):
    import socket

    import jax
    import numpy as np

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for pid in range(2):
        code = (f"from tests.test_parallel import multiprocess_worker; "
                f"multiprocess_worker({pid}, {port}, {str(cifar_npz)!r}, {str(tmp_path / f'p{pid}.npz')!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    reference = jax.tree.leaves(_train(jax.devices()[:1], "pufferfish", 3, str(cifar_npz)))
    for pid in range(2):
        with np.load(tmp_path / f"p{pid}.npz") as got:
            leaves = [got[f"arr_{i}"] for i in range(len(got.files))]
        assert len(leaves) == len(reference)
        for a, b in zip(reference, leaves):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
