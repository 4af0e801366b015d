"""Pre-factorized layers: shapes, parameter counts, exact composition, use from NNX and from Linen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from pufferfish_jax import LowRankConv, LowRankLinear, LowRankLinearGeneral, LowRankLSTMCell, count_params
from pufferfish_jax.layers import GATES

RTOL, ATOL = 1e-5, 1e-5


def rngs(seed=0):
    # An rbg key only to keep the XLA compiles of the initializers short on CPU; the layers
    # build the same way from the default key.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _fill(module, seed=0):
    """Overwrites every Param of ``module`` with float32 normals (biases too, so they are tested)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(rng.standard_normal(var.shape), jnp.float32))
    return module


def _np(x):
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- LowRankLinear


def test_linear_shapes_and_params():
    layer = LowRankLinear(6, 5, 2, rngs=rngs())
    assert (layer.in_features, layer.out_features, layer.rank) == (6, 5, 2)
    assert isinstance(layer.first, nnx.Linear) and isinstance(layer.second, nnx.Linear)
    assert layer.first.kernel.shape == (6, 2) and layer.first.bias is None
    assert layer.second.kernel.shape == (2, 5) and layer.second.bias.shape == (5,)
    assert count_params(layer) == 6 * 2 + 2 * 5 + 5
    no_bias = LowRankLinear(6, 5, 2, use_bias=False, rngs=rngs())
    assert no_bias.second.bias is None and count_params(no_bias) == 6 * 2 + 2 * 5
    y = layer(jnp.ones((3, 6)))
    assert y.shape == (3, 5) and y.dtype == jnp.float32
    assert layer(jnp.ones((2, 4, 6))).shape == (2, 4, 5)  # leading batch dims pass through


def test_linear_is_x_times_product_plus_bias():
    layer = _fill(LowRankLinear(6, 5, 2, rngs=rngs()))
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    a, b, bias = _np(layer.first.kernel[...]), _np(layer.second.kernel[...]), _np(layer.second.bias[...])
    want = _np(x) @ (a @ b) + bias
    np.testing.assert_allclose(_np(layer(jnp.asarray(x))), want, rtol=RTOL, atol=ATOL)
    assert np.linalg.matrix_rank(a @ b) == 2


def test_linear_dtype_options():
    layer = LowRankLinear(6, 5, 2, dtype=jnp.bfloat16, rngs=rngs())
    assert layer.first.kernel.dtype == jnp.float32  # param_dtype stays fp32
    assert layer(jnp.ones((1, 6))).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- LowRankConv


def test_conv_geometry_is_kept_in_first_factor():
    layer = LowRankConv(4, 6, 3, 2, strides=2, padding=1, kernel_dilation=2, rngs=rngs())
    first, second = layer.first, layer.second
    assert isinstance(first, nnx.Conv) and isinstance(second, nnx.Conv)
    assert first.kernel.shape == (3, 3, 4, 2) and first.bias is None
    assert first.strides == 2 and first.padding == 1 and first.kernel_dilation == 2
    assert tuple(first.kernel_size) == (3, 3)
    assert second.kernel.shape == (1, 1, 2, 6) and second.bias.shape == (6,)
    assert second.strides == 1 and second.padding == "VALID" and second.kernel_dilation == 1
    assert count_params(layer) == 3 * 3 * 4 * 2 + 2 * 6 + 6
    # 9×9 input, dilated 3×3 kernel spans 5, padding 1, stride 2 → 4×4.
    assert layer(jnp.ones((2, 9, 9, 4))).shape == (2, 4, 4, 6)


def test_conv_kernel_size_tuple_and_1d():
    layer = LowRankConv(4, 6, (3, 1), 2, rngs=rngs())
    assert layer.first.kernel.shape == (3, 1, 4, 2) and layer.second.kernel.shape == (1, 1, 2, 6)
    one_d = LowRankConv(4, 6, (3,), 2, rngs=rngs())
    assert one_d.second.kernel.shape == (1, 2, 6)
    assert one_d(jnp.ones((2, 7, 4))).shape == (2, 7, 6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strides=2, padding=1, kernel_dilation=2),
        dict(strides=1, padding="SAME"),
        dict(strides=(2, 1), padding=((1, 1), (0, 2)), input_dilation=2),
    ],
)
def test_conv_equals_full_conv_with_product_kernel(kwargs):
    layer = _fill(LowRankConv(4, 6, 3, 2, **kwargs, rngs=rngs()))
    a = _np(layer.first.kernel[...]).reshape(3 * 3 * 4, 2)
    b = _np(layer.second.kernel[...]).reshape(2, 6)
    full_kernel = (a @ b).reshape(3, 3, 4, 6)
    x = np.random.default_rng(2).standard_normal((2, 9, 9, 4)).astype(np.float32)
    # Reference: a plain nnx.Conv with the same geometry whose kernel is A·B.
    ref = nnx.Conv(4, 6, (3, 3), **kwargs, rngs=rngs())
    ref.kernel.set_value(jnp.asarray(full_kernel, jnp.float32))
    ref.bias.set_value(layer.second.bias[...])
    got, want = _np(layer(jnp.asarray(x))), _np(ref(jnp.asarray(x)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # And by hand for one output pixel when the geometry is simple.
    if kwargs.get("padding") == "SAME" and kwargs.get("strides") == 1:
        patch = _np(x)[0, 3:6, 4:7, :]  # centred on (4, 5)
        pixel = np.einsum("hwc,hwco->o", patch, full_kernel) + _np(layer.second.bias[...])
        np.testing.assert_allclose(got[0, 4, 5], pixel, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- LowRankLinearGeneral


def test_linear_general_to_heads():
    layer = _fill(LowRankLinearGeneral(8, (2, 3), 2, rngs=rngs()))
    assert layer.first.kernel.shape == (8, 2) and layer.first.bias is None
    assert layer.second.kernel.shape == (2, 2, 3) and layer.second.bias.shape == (2, 3)
    assert count_params(layer) == 8 * 2 + 2 * 6 + 6
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    y = _np(layer(jnp.asarray(x)))
    assert y.shape == (4, 2, 3)
    a, b = _np(layer.first.kernel[...]), _np(layer.second.kernel[...]).reshape(2, 6)
    want = (_np(x) @ (a @ b) + _np(layer.second.bias[...]).reshape(6)).reshape(4, 2, 3)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


def test_linear_general_from_heads():
    layer = _fill(LowRankLinearGeneral((2, 3), 8, 2, axis=(-2, -1), rngs=rngs()))
    assert layer.first.kernel.shape == (2, 3, 2) and layer.first.bias is None
    assert layer.second.kernel.shape == (2, 8) and layer.second.bias.shape == (8,)
    assert count_params(layer) == 6 * 2 + 2 * 8 + 8
    x = np.random.default_rng(4).standard_normal((5, 2, 3)).astype(np.float32)
    y = _np(layer(jnp.asarray(x)))
    assert y.shape == (5, 8)
    a, b = _np(layer.first.kernel[...]).reshape(6, 2), _np(layer.second.kernel[...])
    want = _np(x).reshape(5, 6) @ (a @ b) + _np(layer.second.bias[...])
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- LowRankLSTMCell


def test_lstm_cell_structure_and_params():
    cell = LowRankLSTMCell(5, 8, rngs=rngs())
    assert cell.rank == 2  # int(0.25·8)
    assert GATES == ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")
    for gate in GATES:
        g = getattr(cell, gate)
        assert type(g) is LowRankLinear and g.rank == 2
        if gate.startswith("i"):
            assert g.first.kernel.shape == (5, 2) and g.second.kernel.shape == (2, 8)
            assert g.second.bias is None
        else:
            assert g.first.kernel.shape == (8, 2) and g.second.kernel.shape == (2, 8)
            assert g.second.bias.shape == (8,)
        assert g.first.bias is None
    # Nothing of the full-rank parent's gates is left over.
    assert count_params(cell) == 4 * (5 * 2 + 2 * 8) + 4 * (8 * 2 + 2 * 8 + 8)
    biases = [p for p, _ in nnx.iter_graph(cell) if p and p[-1] == "bias"]
    assert len(biases) == 4  # exactly one bias per gate (i, f, g, o)
    assert LowRankLSTMCell(5, 8, rank=3, rngs=rngs()).hi.rank == 3


@pytest.mark.parametrize("hidden, rank", [(1500, 375), (650, 162), (10, 2), (400, 100)])
def test_lstm_cell_default_rank(hidden, rank):
    cell = nnx.eval_shape(lambda: LowRankLSTMCell(hidden, hidden, rngs=rngs()))
    assert cell.rank == rank
    assert cell.hf.first.kernel.shape == (hidden, rank)
    assert count_params(cell) == 8 * rank * 2 * hidden + 4 * hidden


def test_lstm_cell_step_by_hand():
    cell = _fill(LowRankLSTMCell(5, 8, rngs=rngs()), seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    c0 = rng.standard_normal((3, 8)).astype(np.float32)
    h0 = rng.standard_normal((3, 8)).astype(np.float32)
    (c1, h1), out = cell((jnp.asarray(c0), jnp.asarray(h0)), jnp.asarray(x))

    def gate(name, inp):
        g = getattr(cell, name)
        y = _np(inp) @ (_np(g.first.kernel[...]) @ _np(g.second.kernel[...]))
        return y if g.second.bias is None else y + _np(g.second.bias[...])

    sig = lambda z: 1 / (1 + np.exp(-z))
    i = sig(gate("ii", x) + gate("hi", h0))
    f = sig(gate("if_", x) + gate("hf", h0))
    g = np.tanh(gate("ig", x) + gate("hg", h0))
    o = sig(gate("io", x) + gate("ho", h0))
    c_want = f * _np(c0) + i * g
    h_want = o * np.tanh(c_want)
    np.testing.assert_allclose(_np(c1), c_want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(h1), h_want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_np(out), _np(h1))
    carry = cell.initialize_carry((3, 5), rngs())
    assert carry[0].shape == carry[1].shape == (3, 8)


def test_lstm_cell_in_nnx_rnn():
    cell = LowRankLSTMCell(5, 8, rngs=rngs())
    rnn = nnx.RNN(cell)
    y = rnn(jnp.ones((2, 7, 5)))
    assert y.shape == (2, 7, 8) and bool(jnp.all(jnp.isfinite(y)))


# ----------------------------------------------------------------------------- inside other models


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = LowRankConv(3, 8, 3, 2, strides=2, padding=1, rngs=rngs)
        self.fc = LowRankLinear(8, 6, 2, rngs=rngs)
        self.out = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x)).mean(axis=(1, 2))
        return self.out(nnx.relu(self.fc(x)))


def test_inside_nnx_model_grads_and_jit():
    model = _Net(rngs())
    assert count_params(model) == (27 * 2 + 2 * 8 + 8) + (8 * 2 + 2 * 6 + 6) + (6 * 4 + 4)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray([1, 3])

    def xent(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    def loss_fn(m):
        return xent(m(x))

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    np.testing.assert_allclose(float(loss), float(loss_fn(model)), rtol=1e-5)  # jit == eager forward
    flat = dict(nnx.to_flat_state(grads))
    assert set(flat) == {
        ("conv", "first", "kernel"), ("conv", "second", "kernel"), ("conv", "second", "bias"),
        ("fc", "first", "kernel"), ("fc", "second", "kernel"), ("fc", "second", "bias"),
        ("out", "kernel"), ("out", "bias"),
    }
    assert flat[("conv", "first", "kernel")].shape == (3, 3, 3, 2)
    assert flat[("fc", "second", "kernel")].shape == (2, 6)
    for path, g in flat.items():
        assert float(jnp.abs(g[...]).sum()) > 0, path  # every factor receives gradient
    # Chain rule through the factors of fc: with W = A·B, dL/dA = dL/dW·Bᵀ and dL/dB = Aᵀ·dL/dW.
    h = nnx.relu(model.conv(x)).mean(axis=(1, 2))
    a, b = model.fc.first.kernel[...], model.fc.second.kernel[...]

    def via_full(w):
        return xent(model.out(nnx.relu(h @ w + model.fc.second.bias[...])))

    g_w = np.asarray(jax.grad(via_full)(a @ b), np.float64)
    np.testing.assert_allclose(_np(flat[("fc", "first", "kernel")][...]), g_w @ _np(b).T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_np(flat[("fc", "second", "kernel")][...]), _np(a).T @ g_w, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- from Linen


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nnx.bridge.ToLinen(LowRankLinear, args=(6, 5, 2), name="low_rank")(x)
        return nn.Dense(3, name="head")(nn.relu(x))


def test_from_linen_via_bridge():
    model = _LinenNet()
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 6)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    lr = params["low_rank"]
    assert set(lr) == {"first", "second"}
    assert nn.unbox(lr["first"]["kernel"]).shape == (6, 2)
    assert "bias" not in lr["first"]
    assert nn.unbox(lr["second"]["kernel"]).shape == (2, 5)
    assert nn.unbox(lr["second"]["bias"]).shape == (5,)
    n_params = sum(np.size(v) for v in jax.tree.leaves(nn.unbox(params)))
    assert n_params == (6 * 2 + 2 * 5 + 5) + (5 * 3 + 3)

    y = model.apply(variables, x)
    assert y.shape == (4, 3)
    p = jax.tree.map(_np, nn.unbox(params))
    h = np.maximum(_np(x) @ p["low_rank"]["first"]["kernel"] @ p["low_rank"]["second"]["kernel"]
                   + p["low_rank"]["second"]["bias"], 0)
    want = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(_np(y), want, rtol=1e-4, atol=1e-5)

    def loss(params):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    g = nn.unbox(grads)
    assert g["low_rank"]["first"]["kernel"].shape == (6, 2)
    assert g["low_rank"]["second"]["kernel"].shape == (2, 5)
    assert float(jnp.abs(g["low_rank"]["first"]["kernel"]).sum()) > 0
    # A gradient step changes the output: the Linen params really drive the NNX layer.
    stepped = jax.tree.map(lambda a, b: a - 1e-3 * b, nn.unbox(params), g)
    assert float(loss(stepped)) < float(loss(nn.unbox(params)))
