"""factorize: the truncated-SVD switch, checked against float64 numpy SVDs, on single layers and whole models."""

import importlib
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pufferfish_jax import (
    LowRankConv,
    LowRankLinear,
    LowRankLinearGeneral,
    count_params,
    factorize,
    plan,
)
from pufferfish_jax.models import cifar_resnet, cifar_vgg

# ``pufferfish_jax.factorize`` is the function (re-exported by the package), not the module.
fz = importlib.import_module("pufferfish_jax.factorize")

METHODS = ("eigh", "svd")


# ----------------------------------------------------------------------------- helpers


def materialize(model, seed=0):
    """Gives an abstract (``nnx.eval_shape``) model concrete values from numpy, with no XLA compiles:
    kernels ~ N(0, 1/fan_in), biases and BN affine/statistics non-trivial, RNG state real."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        name, shape = path[-1], var.shape
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.key(seed))
        elif isinstance(var, nnx.RngCount):
            var.set_value(jnp.zeros(shape, jnp.uint32))
        elif name == "kernel":
            fan_in = math.prod(shape[:-1])
            var.set_value(jnp.asarray(rng.standard_normal(shape) / math.sqrt(fan_in), jnp.float32))
        elif name == "scale":
            var.set_value(jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32))
        elif name == "var":
            var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32))
        elif name in ("bias", "mean"):
            var.set_value(jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32))
        else:
            raise AssertionError(f"unexpected variable {path}")
    return model


def tiny_resnet(seed=0):
    return materialize(nnx.eval_shape(lambda: cifar_resnet.resnet18(width=0.125, rngs=nnx.Rngs(0))), seed)


def tiny_vgg(seed=0):
    return materialize(nnx.eval_shape(lambda: cifar_vgg.vgg19(width=0.125, rngs=nnx.Rngs(0))), seed)


def abstract_resnet(*steps):
    """A tiny ResNet-18 built and factorized entirely abstractly (no compile, no memory):
    each step is ``(args, kwargs)`` for one ``factorize(model, *args, init="random", **kwargs)``.
    Returns the abstract model and the list of layers each step replaced."""
    results = []

    def build():
        model = cifar_resnet.resnet18(width=0.125, rngs=nnx.Rngs(0))
        for args, kwargs in steps:
            results.append(factorize(model, *args, init="random", **kwargs))
        return model

    return nnx.eval_shape(build), results


def locate(model, path):
    node = model
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def truncated(w, r):
    """(rank-r reconstruction, all singular values) of ``w`` in float64."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s


def product(layer, fan_in, fan_out):
    """(A, B) in float64 of a low-rank module: the first kernel as fan_in × r, the second as r × fan_out."""
    r = layer.rank
    a = np.asarray(layer.first.kernel[...], np.float64).reshape(fan_in, r)
    b = np.asarray(layer.second.kernel[...], np.float64).reshape(r, fan_out)
    return a, b


def with_spectrum(rng, fan_in, fan_out):
    """A fan_in × fan_out matrix with random singular vectors and well separated singular values."""
    n = min(fan_in, fan_out)
    u, _ = np.linalg.qr(rng.standard_normal((fan_in, n)))
    v, _ = np.linalg.qr(rng.standard_normal((fan_out, n)))
    s = np.linspace(2.0, 0.1, n)
    return (u * s) @ v.T


@pytest.fixture(scope="module")
def eval_fn():
    """One jitted eval-mode forward per model structure."""

    @nnx.jit
    def forward(model, x):
        return model(x)

    def run(model, x):
        model.eval()
        return np.asarray(forward(model, x), np.float64)

    return run


# ----------------------------------------------------------------------------- (a) single layers


class Zoo(nnx.Module):
    """One of each factorizable kind: Linear, a strided 3×3 Conv, LinearGeneral to heads, an LSTMCell."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(48, 20, rngs=rngs)
        self.conv = nnx.Conv(8, 16, (3, 3), strides=2, padding=1, rngs=rngs)
        self.general = nnx.LinearGeneral(24, (2, 8), rngs=rngs)
        self.cell = nnx.LSTMCell(12, 16, rngs=rngs)


# path → (fan_in, fan_out, rank at ratio 0.25)
ZOO_LAYERS = {
    "linear": (48, 20, 5),
    "conv": (72, 16, 4),
    "general": (24, 16, 4),
    **{f"cell.{g}": (12, 16, 3) for g in ("ii", "if_", "ig", "io")},
    **{f"cell.{g}": (16, 16, 4) for g in ("hi", "hf", "hg", "ho")},
}


def make_zoo(seed=0):
    zoo = materialize(nnx.eval_shape(lambda: Zoo(nnx.Rngs(0))), seed)
    rng = np.random.default_rng(100 + seed)
    for path, (fan_in, fan_out, _) in ZOO_LAYERS.items():
        layer = locate(zoo, path)
        w = with_spectrum(rng, fan_in, fan_out)
        layer.kernel.set_value(jnp.asarray(w.reshape(layer.kernel.shape), jnp.float32))
    return zoo


@pytest.mark.parametrize("method", METHODS)
def test_factors_are_the_truncated_svd(method):
    zoo = make_zoo()
    originals = {p: np.asarray(locate(zoo, p).kernel[...], np.float64) for p in ZOO_LAYERS}
    biases = {p: np.asarray(locate(zoo, p).bias[...]) for p in ZOO_LAYERS if locate(zoo, p).bias is not None}
    assert set(biases) == {"linear", "conv", "general", "cell.hi", "cell.hf", "cell.hg", "cell.ho"}

    layers = factorize(zoo, 0.25, method=method)
    assert {l.path: (l.fan_in, l.fan_out, l.rank) for l in layers} == ZOO_LAYERS
    assert {l.path: l.kind for l in layers}["general"] == "linear_general"

    for path, (fan_in, fan_out, r) in ZOO_LAYERS.items():
        layer = locate(zoo, path)
        assert layer.rank == r
        w = originals[path].reshape(fan_in, fan_out)
        want, s = truncated(w, r)
        a, b = product(layer, fan_in, fan_out)
        ab = a @ b
        norm = np.linalg.norm(w)
        assert np.linalg.norm(ab - want) / norm < 1e-4, path
        # ‖W − AB‖_F is exactly the norm of the discarded singular values.
        np.testing.assert_allclose(np.linalg.norm(w - ab), np.linalg.norm(s[r:]), rtol=1e-4, err_msg=path)
        # Balanced split: first = U_rΣ_r^½, second = Σ_r^½V_rᵀ, so AᵀA = BBᵀ = Σ_r.
        np.testing.assert_allclose(a.T @ a, np.diag(s[:r]), atol=1e-4 * s[0], err_msg=path)
        np.testing.assert_allclose(b @ b.T, np.diag(s[:r]), atol=1e-4 * s[0], err_msg=path)
        # The bias moves, unchanged, to the second factor; the first has none.
        assert layer.first.bias is None
        if path in biases:
            np.testing.assert_array_equal(np.asarray(layer.second.bias[...]), biases[path])
        else:
            assert layer.second.bias is None
        assert layer.first.kernel.dtype == layer.second.kernel.dtype == jnp.float32


def test_replaced_modules_keep_their_geometry():
    zoo = make_zoo()
    factorize(zoo, 0.25)
    assert type(zoo.linear) is LowRankLinear and zoo.linear.second.kernel.shape == (5, 20)
    conv = zoo.conv
    assert type(conv) is LowRankConv
    assert conv.first.kernel.shape == (3, 3, 8, 4) and conv.second.kernel.shape == (1, 1, 4, 16)
    assert conv.first.strides == 2 and conv.first.padding == 1
    general = zoo.general
    assert type(general) is LowRankLinearGeneral
    assert general.first.kernel.shape == (24, 4) and general.second.kernel.shape == (4, 2, 8)
    assert general.second.bias.shape == (2, 8)
    for g in ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho"):
        assert type(getattr(zoo.cell, g)) is LowRankLinear


@pytest.mark.parametrize("method", METHODS)
def test_factorized_layers_compute_the_truncated_layer(method):
    """The forward of each replaced layer equals the original layer with its kernel truncated."""
    zoo = make_zoo(seed=1)
    ref = nnx.clone(zoo)
    factorize(zoo, 0.25, method=method)
    for path, (fan_in, fan_out, r) in ZOO_LAYERS.items():
        old = locate(ref, path)
        want, _ = truncated(np.asarray(old.kernel[...]).reshape(fan_in, fan_out), r)
        old.kernel.set_value(jnp.asarray(want.reshape(old.kernel.shape), jnp.float32))
    rng = np.random.default_rng(2)
    x_lin = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
    x_img = jnp.asarray(rng.standard_normal((2, 7, 7, 8)), jnp.float32)
    x_gen = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    carry = tuple(jnp.asarray(rng.standard_normal((3, 16)), jnp.float32) for _ in range(2))
    x_seq = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
    pairs = [
        (zoo.linear(x_lin), ref.linear(x_lin)),
        (zoo.conv(x_img), ref.conv(x_img)),
        (zoo.general(x_gen), ref.general(x_gen)),
        (zoo.cell(carry, x_seq)[1], ref.cell(carry, x_seq)[1]),
    ]
    assert zoo.conv(x_img).shape == (2, 4, 4, 16)
    for got, want in pairs:
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- (b) whole models


def _check_model_against_truncated_reference(model, keep, n_expected, input_shape, eval_fn, method="eigh"):
    ref = nnx.clone(model)
    x = jnp.asarray(np.random.default_rng(3).standard_normal(input_shape), jnp.float32)
    untruncated = eval_fn(ref, x)
    layers = factorize(model, 0.25, keep, init="svd", method=method)
    assert len(layers) == n_expected
    for layer in layers:
        old = locate(ref, layer.path)
        assert type(old) in (nnx.Conv, nnx.Linear)
        want, _ = truncated(np.asarray(old.kernel[...]).reshape(layer.fan_in, layer.fan_out), layer.rank)
        old.kernel.set_value(jnp.asarray(want.reshape(old.kernel.shape), jnp.float32))
    got, want = eval_fn(model, x), eval_fn(ref, x)
    assert got.shape == (input_shape[0], 10) and np.all(np.isfinite(got))
    scale = np.abs(want).max()
    assert scale > 1e-2  # a non-degenerate output
    # The truncation matters (so the comparison below is not vacuous) ...
    assert np.abs(untruncated - want).max() > 1e-2 * scale
    # ... and the factorized model computes exactly the truncated one (observed error ~2e-6).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    return layers


def test_resnet18_switch_equals_truncated_model(eval_fn):
    model = tiny_resnet()
    _check_model_against_truncated_reference(model, cifar_resnet.KEEP_FULL_RANK, 14, (2, 32, 32, 3), eval_fn)


def test_vgg19_switch_equals_truncated_model(eval_fn):
    model = tiny_vgg()
    _check_model_against_truncated_reference(model, cifar_vgg.KEEP_FULL_RANK, 9, (2, 32, 32, 3), eval_fn)


# ----------------------------------------------------------------------------- (c) surgery details


def _leaves(model, *filters):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, *filters))}


def test_resnet18_hybrid_layers_and_untouched_state():
    model = tiny_resnet()
    bn_params_before = {p: v for p, v in _leaves(model, nnx.Param).items() if p[-1] in ("scale", "bias")}
    stats_before = _leaves(model, nnx.BatchStat)
    kept_kernels = {
        p: v for p, v in _leaves(model, nnx.Param).items()
        if p[0] in ("conv1", "linear") or p[:2] == ("layer1", 0) or "shortcut" in p
    }
    assert sum(p[-1] == "kernel" for p in kept_kernels) == 7  # stem, 2 in layer1.0, 3 shortcuts, linear
    layers = factorize(model, 0.25, cifar_resnet.KEEP_FULL_RANK)
    paths = [l.path for l in layers]
    assert paths == [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)][2:]
    # width 0.125: stages 8, 16, 32, 64 channels; rank = min(9·c_in, c_out) // 4
    ranks = {l.path: l.rank for l in layers}
    assert ranks["layer1.1.conv1"] == 2 and ranks["layer2.0.conv1"] == 4 and ranks["layer4.1.conv2"] == 16
    assert type(model.conv1) is nnx.Conv and type(model.linear) is nnx.Linear
    assert type(model.layer1[0].conv1) is nnx.Conv and type(model.layer1[0].conv2) is nnx.Conv
    for s in (2, 3, 4):
        assert type(getattr(model, f"layer{s}")[0].shortcut.layers[0]) is nnx.Conv
    for p in paths:
        assert type(locate(model, p)) is LowRankConv
    after = _leaves(model, nnx.Param)
    for p, v in kept_kernels.items():
        np.testing.assert_array_equal(after[p], v, err_msg=str(p))
    for p, v in bn_params_before.items():
        np.testing.assert_array_equal(after[p], v, err_msg=str(p))
    stats_after = _leaves(model, nnx.BatchStat)
    assert stats_after.keys() == stats_before.keys()
    for p, v in stats_before.items():
        np.testing.assert_array_equal(stats_after[p], v, err_msg=str(p))


def test_vgg19_hybrid_layers():
    model = nnx.eval_shape(lambda: cifar_vgg.vgg19(width=0.125, rngs=nnx.Rngs(0)))
    layers = plan(model, 0.25, cifar_vgg.KEEP_FULL_RANK)
    assert [l.path for l in layers] == [f"convs.{i}" for i in range(9, 16)] + ["fc1", "fc2"]
    assert [l.rank for l in layers] == [16] * 9  # 64 channels / hidden 64 at width 0.125
    assert [l.kind for l in layers] == ["conv"] * 7 + ["linear"] * 2


def test_rank_ratio_one_changes_nothing():
    model = tiny_resnet()
    graph_before, before = nnx.graphdef(model), _leaves(model)
    assert factorize(model, 1.0) == []
    assert factorize(model, 1.0, cifar_resnet.KEEP_FULL_RANK) == []
    assert nnx.graphdef(model) == graph_before
    after = _leaves(model)
    assert after.keys() == before.keys()
    for p, v in before.items():
        np.testing.assert_array_equal(after[p], v)


def test_overrides_by_path():
    full = count_params(nnx.eval_shape(lambda: cifar_resnet.resnet18(width=0.125, rngs=nnx.Rngs(0))))
    overrides = {"layer4.*": 0.5, "layer2.0.conv1": 1.0, "layer3.1.conv2": 0.125}
    model, (layers,) = abstract_resnet(((0.25, cifar_resnet.KEEP_FULL_RANK, overrides), {}))
    ranks = {l.path: l.rank for l in layers}
    assert len(layers) == 13 and "layer2.0.conv1" not in ranks
    assert type(model.layer2[0].conv1) is nnx.Conv
    assert all(ranks[f"layer4.{b}.conv{c}"] == 32 for b in range(2) for c in (1, 2))
    assert ranks["layer3.1.conv2"] == 4 and ranks["layer3.0.conv1"] == 8
    assert model.layer4[1].conv2.rank == 32 and model.layer4[1].conv2.first.kernel.shape == (3, 3, 64, 32)
    assert count_params(model) == full - sum(l.params_saved for l in layers)
    # An override also applies to a layer the hybrid list would otherwise factorize ... but
    # keep_full_rank wins over an override.
    _, (layers,) = abstract_resnet(((0.25, cifar_resnet.KEEP_FULL_RANK, {"layer1.0.*": 0.5}), {}))
    assert len(layers) == 14 and all(not l.path.startswith("layer1.0") for l in layers)


def test_factorize_twice_does_not_resplit():
    hybrid = ((0.25, cifar_resnet.KEEP_FULL_RANK), {})
    model, results = abstract_resnet(
        hybrid,
        hybrid,  # again: nothing left to do
        ((0.5, cifar_resnet.KEEP_FULL_RANK), {}),  # another ratio: still nothing
        ((0.25,), {}),  # no hybrid list: only the layers still full rank
        ((0.25,), {}),
    )
    first, second, third, fourth, fifth = results
    assert len(first) == 14 and second == [] and third == [] and fifth == []
    # The factors themselves (e.g. layer4's 576×16 first conv, rank 4 would save) are never split.
    assert {l.path for l in fourth} == {
        "conv1", "layer1.0.conv1", "layer1.0.conv2", "linear",
        "layer2.0.shortcut.layers.0", "layer3.0.shortcut.layers.0", "layer4.0.shortcut.layers.0",
    }
    assert type(model.layer4[1].conv2) is LowRankConv
    assert type(model.layer4[1].conv2.first) is nnx.Conv and type(model.layer4[1].conv2.second) is nnx.Conv
    assert type(model.layer2[0].shortcut.layers[0]) is LowRankConv
    assert plan(model, 0.1) == []


def test_factorize_twice_real_model_unchanged():
    model = tiny_resnet()
    factorize(model, 0.25, cifar_resnet.KEEP_FULL_RANK)
    n, graph, before = count_params(model), nnx.graphdef(model), _leaves(model)
    assert factorize(model, 0.25, cifar_resnet.KEEP_FULL_RANK) == []
    assert count_params(model) == n and nnx.graphdef(model) == graph
    after = _leaves(model)
    for p, v in before.items():
        np.testing.assert_array_equal(after[p], v)


def test_factorize_twice_on_a_low_rank_layer_as_model_root():
    # A low-rank layer that is the model itself: its factors (576×16, 16×64) are not split either.
    layer = nnx.eval_shape(lambda: LowRankConv(64, 64, 3, 16, rngs=nnx.Rngs(0)))
    assert plan(layer, 0.25) == []
    assert plan(layer, 0.5) == []


def test_a_bare_layer_is_refused_with_a_clear_error():
    layer = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot replace the model itself .*bare Linear"):
        factorize(layer, 0.25)
    assert type(layer) is nnx.Linear and layer.kernel.shape == (64, 64)


def test_random_init_same_structure_without_svd(monkeypatch):
    svd_model, rand_model = tiny_resnet(), tiny_resnet()
    svd_layers = factorize(svd_model, 0.25, cifar_resnet.KEEP_FULL_RANK)

    def no_svd(*args, **kwargs):
        raise AssertionError("init='random' must not compute an SVD")

    monkeypatch.setattr(fz, "_factor_kernels", no_svd)
    # An rbg key only to keep the test's XLA compiles short; the default key works the same.
    rngs = nnx.Rngs(jax.random.key(1, impl="rbg"))
    rand_layers = factorize(rand_model, 0.25, cifar_resnet.KEEP_FULL_RANK, init="random", rngs=rngs)
    assert rand_layers == svd_layers
    assert nnx.graphdef(rand_model) == nnx.graphdef(svd_model)
    shapes = lambda m: jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(m))
    assert shapes(rand_model) == shapes(svd_model)
    assert count_params(rand_model) == count_params(svd_model)
    # Fresh factors, not the SVD ones.
    assert not np.allclose(np.asarray(rand_model.layer2[0].conv1.first.kernel[...]),
                           np.asarray(svd_model.layer2[0].conv1.first.kernel[...]))
    with pytest.raises(ValueError):
        factorize(tiny_resnet(), 0.25, init="bogus")


def _primitive_counts(jaxpr, counts=None):
    """Primitive name → occurrences, nested jaxprs (jit, custom_jvp, ...) included."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _primitive_counts(sub.jaxpr, counts)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _primitive_counts(sub, counts)
    return counts


def test_one_compiled_call_reused_for_same_shapes(monkeypatch):
    calls = []
    real = fz._factor_kernels

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(fz, "_factor_kernels", counting)
    a = tiny_resnet(seed=0)
    factorize(a, 0.25, cifar_resnet.KEEP_FULL_RANK)
    size = real._cache_size()
    assert len(calls) == 1 and len(calls[0][0][0]) == 14  # all 14 kernels go in one call
    b = tiny_resnet(seed=1)
    factorize(b, 0.25, cifar_resnet.KEEP_FULL_RANK)
    assert len(calls) == 2
    assert real._cache_size() == size  # same shapes: the executable is reused, no recompilation
    # Different values gave different factors through the same executable.
    assert not np.allclose(np.asarray(a.layer3[0].conv1.first.kernel[...]),
                           np.asarray(b.layer3[0].conv1.first.kernel[...]))
    # The call is one jitted program holding every decomposition: 7 groups of same-shaped
    # matrices; on CPU one eigh per matrix (see factorize._batched), elsewhere one per group.
    args, kwargs = calls[0]
    assert len(set(zip(kwargs["fans"], kwargs["ranks"]))) == 7
    jaxpr = jax.make_jaxpr(lambda ks: real(ks, **kwargs))(*args)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] in (["jit"], ["pjit"])
    counts = _primitive_counts(jaxpr.jaxpr)
    assert counts.get("eigh", 0) == (14 if jax.default_backend() == "cpu" else 7)
    assert counts.get("svd", 0) == 0


# ----------------------------------------------------------------------------- (d) rank-deficient weights


class _Pair(nnx.Module):
    def __init__(self, rngs):
        self.zero = nnx.Linear(16, 12, rngs=rngs)
        self.rank2 = nnx.Linear(16, 12, rngs=rngs)
        self.conv_zero = nnx.Conv(4, 12, (2, 2), rngs=rngs)


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_weights(method):
    model = materialize(nnx.eval_shape(lambda: _Pair(nnx.Rngs(0))))
    rng = np.random.default_rng(9)
    w2 = rng.standard_normal((16, 2)) @ rng.standard_normal((2, 12))
    model.zero.kernel.set_value(jnp.zeros((16, 12), jnp.float32))
    model.rank2.kernel.set_value(jnp.asarray(w2, jnp.float32))
    model.conv_zero.kernel.set_value(jnp.zeros((2, 2, 4, 12), jnp.float32))
    layers = factorize(model, 0.34, method=method)  # r = int(12·0.34) = 4 > rank 2
    assert {l.path: l.rank for l in layers} == {"zero": 4, "rank2": 4, "conv_zero": 4}
    for path, w in (("zero", np.zeros((16, 12))), ("rank2", w2), ("conv_zero", np.zeros((16, 12)))):
        a, b = product(locate(model, path), 16, 12)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), path
        np.testing.assert_allclose(a @ b, w, atol=1e-5 * max(1.0, np.abs(w).max()), err_msg=path)
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    bias = np.broadcast_to(np.asarray(model.zero.second.bias[...]), (3, 12))
    np.testing.assert_allclose(np.asarray(model.zero(x)), bias, atol=1e-6)
