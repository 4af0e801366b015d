"""The XLA flag module (``pufferfish_jax.runtime``) and a smoke run of ``experiments/bench_step.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pufferfish_jax import runtime

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("PUFFERFISH_DATA", str(REPO / ".." / "shared" / "data"))


@pytest.fixture
def env(monkeypatch):
    """A clean XLA_FLAGS / PUFFERFISH_NO_XLA_FLAGS environment (restored afterwards)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("PUFFERFISH_NO_XLA_FLAGS", raising=False)
    return monkeypatch


def _names(flags: str) -> list[str]:
    return [tok.split("=", 1)[0] for tok in flags.split()]


def test_flags_are_version_guarded():
    assert runtime.CPU_FLAGS, "the module should choose at least one flag for jaxlib 0.10"
    for flag, value, since in runtime.CPU_FLAGS:
        assert flag.startswith("--xla_") and "=" not in flag and " " not in value
        assert isinstance(since, tuple) and len(since) == 2


def test_adds_flags_for_supported_jaxlib(env):
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    expected = [f"{flag}={value}" for flag, value, _ in runtime.CPU_FLAGS]
    assert runtime.chosen_flags() == expected
    out = runtime.apply()
    assert out.split() == expected
    assert os.environ["XLA_FLAGS"] == out
    assert runtime.apply() == out  # idempotent: nothing is added twice


@pytest.mark.parametrize("version", [None, (0, 4), (0, 8)])
def test_adds_nothing_for_old_or_unknown_jaxlib(env, version):
    env.setattr(runtime, "_jaxlib_version", lambda: version)
    assert runtime.chosen_flags() == []
    assert runtime.apply() == ""
    assert "XLA_FLAGS" not in os.environ


def test_each_flag_needs_its_own_minimum_version(env):
    for flag, value, since in runtime.CPU_FLAGS:
        older = (since[0], since[1] - 1) if since[1] > 0 else (since[0] - 1, 99)
        env.setattr(runtime, "_jaxlib_version", lambda v=older: v)
        assert f"{flag}={value}" not in runtime.chosen_flags()
        env.setattr(runtime, "_jaxlib_version", lambda v=since: v)
        assert f"{flag}={value}" in runtime.chosen_flags()


def test_never_overrides_a_flag_the_user_set(env):
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    for flag, _, _ in runtime.CPU_FLAGS:
        user = f"--xla_dump_to=/tmp/x {flag}=user_value"
        env.setenv("XLA_FLAGS", user)
        out = runtime.apply()
        assert out.startswith(user)  # the user's flags come first, untouched
        assert _names(out).count(flag) == 1
        assert f"{flag}=user_value" in out.split()


def test_a_longer_flag_name_is_not_mistaken_for_ours(env):
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    flag, value, _ = runtime.CPU_FLAGS[0]
    env.setenv("XLA_FLAGS", f"{flag}_something_else=1")
    assert f"{flag}={value}" in runtime.apply().split()


def test_opt_out(env):
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    env.setenv("PUFFERFISH_NO_XLA_FLAGS", "1")
    assert runtime.apply() == ""
    assert "XLA_FLAGS" not in os.environ
    env.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert runtime.apply() == "--xla_dump_to=/tmp/x"
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"


def test_jaxlib_version_parsing(monkeypatch):
    import importlib.metadata

    for text, parsed in [("0.10.2", (0, 10)), ("0.11.0.dev20260101", (0, 11)), ("1.2", (1, 2)), ("weird", None)]:
        monkeypatch.setattr(importlib.metadata, "version", lambda _name, t=text: t)
        assert runtime._jaxlib_version() == parsed


def test_installed_jaxlib_accepts_the_chosen_flags():
    """Unknown XLA flags (or flag values) abort the process: run a computation in a fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PUFFERFISH_NO_XLA_FLAGS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import os, pufferfish_jax, jax, jax.numpy as jnp; "
            "x = jnp.ones((2, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4)); "
            "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
            "print(float(y.sum())); print(os.environ.get('XLA_FLAGS', ''))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, flags = proc.stdout.strip().splitlines()
    assert float(value) == 2 * 4 * 3 * (3 * 8 - 2) ** 2  # batch · out channels · in channels · valid taps
    assert flags.split() == runtime.chosen_flags()


def test_train_step_options_only_on_cpu_and_verified_jaxlib(env):
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    env.setattr(runtime, "_USER_XLA_FLAGS", "")
    expected = {name: value for name, value, _ in runtime.TRAIN_STEP_CPU_OPTIONS}
    assert expected and runtime.train_step_options("cpu") == expected
    assert runtime.train_step_options("gpu") is None and runtime.train_step_options("tpu") is None
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 11))  # not verified there: nothing
    assert runtime.train_step_options("cpu") is None
    env.setattr(runtime, "_jaxlib_version", lambda: None)
    assert runtime.train_step_options("cpu") is None


def test_train_step_options_yield_to_the_user(env):
    env.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    env.setattr(runtime, "_USER_XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert runtime.train_step_options("cpu") is None
    env.setattr(runtime, "_USER_XLA_FLAGS", "")
    env.setenv("PUFFERFISH_NO_XLA_FLAGS", "1")
    assert runtime.train_step_options("cpu") is None


def test_train_step_with_its_options_matches_plain_compilation():
    """The project's train step (compiled with its CPU options) and the same function compiled
    plainly agree after two steps of a real ResNet on real images: the options change speed only."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from pufferfish_jax import factorize
    from pufferfish_jax.data.cifar import load_npz
    from pufferfish_jax.models.cifar_resnet import KEEP_FULL_RANK, resnet18
    from pufferfish_jax.parallel import data_mesh, global_batch, place_state
    from pufferfish_jax.reducers import all_reduce
    from pufferfish_jax.train.tasks import image_classification
    from pufferfish_jax.train.state import init_state, split_model
    from pufferfish_jax.train.steps import make_train_step

    if not os.path.exists(os.path.join(DATA_DIR, "cifar10_subset.npz")):
        pytest.skip(f"{DATA_DIR}/cifar10_subset.npz not found (set PUFFERFISH_DATA)")
    train, _ = load_npz(os.path.join(DATA_DIR, "cifar10_subset.npz"))
    model = resnet18(width=0.125, rngs=nnx.Rngs(0))
    factorize(model, 0.25, KEEP_FULL_RANK)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(decay=0.9))
    mesh = data_mesh()
    graphdef, _, params, rest = split_model(model)
    step = make_train_step(graphdef, image_classification(), tx, all_reduce(), mesh)
    plain = jax.jit(step.__wrapped__, donate_argnums=0)
    batch = global_batch({"image": train.images[:32], "label": train.labels[:32]}, mesh)
    lr = jnp.asarray(0.1, jnp.float32)
    results = []
    for fn in (step, plain):
        fresh = jax.tree.map(jnp.copy, (params, rest))  # the steps donate their state
        state = place_state(init_state(*fresh, tx, all_reduce(), mesh.size), mesh)
        for _ in range(2):
            state, metrics = fn(state, batch, lr)
        results.append((jax.tree.map(np.asarray, state.params), float(metrics["loss_sum"])))
    (p_opt, loss_opt), (p_plain, loss_plain) = results
    assert loss_opt == pytest.approx(loss_plain, rel=1e-4)
    for a, b in zip(jax.tree.leaves(p_opt), jax.tree.leaves(p_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_amdahl_bound():
    from experiments.bench_step import amdahl

    assert amdahl(0.0, 2.56) == pytest.approx(1.0)
    assert amdahl(1.0, 2.56) == pytest.approx(2.56)
    assert amdahl(0.5, 2.0) == pytest.approx(1 / 0.75)


def test_mac_eqns_finds_convs_and_dots_in_nested_jaxprs():
    import jax
    import jax.numpy as jnp

    from experiments.bench_step import mac_eqns

    def f(x, w, m):
        def loss(w):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jax.jit(lambda y: jnp.sum(jax.nn.relu(y.reshape(-1, 4) @ m)))(y)
        return jax.grad(loss)(w)

    jaxpr = jax.make_jaxpr(f)(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((4, 4)))
    names = sorted(e.primitive.name for e in mac_eqns(jaxpr.jaxpr))
    # forward conv + dot, and in the backward the dot's input gradient and the conv's kernel gradient
    assert names.count("conv_general_dilated") == 2 and names.count("dot_general") == 2


def test_bench_step_smoke(tmp_path):
    """The benchmark at tiny settings (with --profile): its last line is the JSON summary."""
    if not os.path.exists(os.path.join(DATA_DIR, "cifar10_subset.npz")):
        pytest.skip(f"{DATA_DIR}/cifar10_subset.npz not found (set PUFFERFISH_DATA)")
    env = dict(os.environ, PUFFERFISH_DATA=DATA_DIR)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(REPO / "experiments" / "bench_step.py"), "--width", "0.0625", "--batch-size", "8",
           "--steps", "2", "--warmup", "1", "--transition-models", "1", "--profile", "--profile-steps", "1", "--trace"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("vanilla_ms", "pufferfish_ms", "speedup", "transition_s", "xla_flags", "jax_version",
                "width", "batch_size", "arch"):
        assert key in summary, key
    assert summary["arch"] == "resnet18" and summary["width"] == 0.0625 and summary["batch_size"] == 8
    assert summary["vanilla_ms"] > 0 and summary["pufferfish_ms"] > 0 and summary["transition_s"] > 0
    assert summary["speedup"] == pytest.approx(summary["vanilla_ms"] / summary["pufferfish_ms"], rel=1e-3)
    profile = summary["profile"]
    assert profile["vanilla_ms"]["conv_dot"] > 0 and profile["pufferfish_ms"]["conv_dot"] > 0
    assert profile["vanilla_conv_dot_ops"] > 0 and 0 < profile["conv_fraction"] <= 1
    assert 1.0 <= profile["amdahl_bound"] <= summary["mac_ratio"]
    trace = summary["trace"]  # the fused kernels of both steps, by kind, from a real profiler trace
    for name in ("vanilla", "pufferfish"):
        assert trace[name]["transpose"] > 0 and trace[name]["transpose_count"] > 0
        assert trace[name]["ynnpack"] >= 0 and trace[name]["other fusions"] > 0


def test_bench_step_help():
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_step.py"), "--help"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 0
    for flag in ("--arch", "--width", "--batch-size", "--steps", "--ranks", "--profile"):
        assert flag in proc.stdout


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_single_threaded_blas_limits_on_cpu_and_restores():
    import jax.numpy as jnp

    jnp.linalg.eigh(jnp.eye(3)).eigenvalues.block_until_ready()  # loads jaxlib's LAPACK
    before = _blas_threads()
    assert before, "threadpoolctl should find the BLAS behind numpy/jaxlib"
    with runtime.single_threaded_blas("cpu"):
        assert all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before
    with runtime.single_threaded_blas("gpu"):  # LAPACK on the host is not what runs there
        assert _blas_threads() == before
    with pytest.raises(RuntimeError):
        with runtime.single_threaded_blas("cpu"):
            raise RuntimeError("a failing switch")
    assert _blas_threads() == before


def test_factorize_restores_blas_threads():
    from flax import nnx

    from pufferfish_jax import factorize

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(64, 64, rngs=nnx.Rngs(0))

    before = _blas_threads()
    assert factorize(Net(), 0.25)
    assert _blas_threads() == before
