"""``pufferfish_jax.convolution``: same numbers as ``lax.conv_general_dilated``, without XLA:CPU's swapped slow path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from pufferfish_jax import factorize
from pufferfish_jax.convolution import conv_general_dilated
from pufferfish_jax.layers import LowRankConv
from pufferfish_jax.models import cifar_vgg


def _dn(x, k):
    return lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))


def _loss(conv, padding, strides=(1, 1)):
    def loss(x, k):
        y = conv(x, k, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1), dimension_numbers=_dn(x, k))
        return 0.5 * jnp.sum(y * jnp.cos(y)), y
    return loss


@pytest.mark.parametrize("spatial,window,padding", [
    ((2, 2), (3, 3), "SAME"), ((2, 2), (3, 3), ((1, 1), (1, 1))), ((2, 2), (3, 3), ((2, 0), (0, 1))),
    ((1, 1), (3, 3), "SAME"), ((2, 3), (5, 3), "SAME"), ((2, 3), (5, 3), ((3, 1), (1, 1))),
    ((1, 1), (3, 3), ((0, 0), (0, 0))),  # empty output: left to lax
])
def test_small_inputs_match_lax_values_and_gradients(spatial, window, padding):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (4, *spatial, 6))
    k = jax.random.normal(kk, (*window, 6, 5))
    ours = jax.jit(jax.value_and_grad(_loss(conv_general_dilated, padding), (0, 1), has_aux=True))(x, k)
    ref = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, padding), (0, 1), has_aux=True))(x, k)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_second_order_gradient_matches_lax():
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, 3))
    k = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))

    def grad_norm(conv):
        g = jax.grad(lambda x, k: _loss(conv, "SAME")(x, k)[0], 0)
        return lambda x, k: jnp.sum(g(x, k) ** 2)

    ours = jax.grad(grad_norm(conv_general_dilated), 1)(x, k)
    ref = jax.grad(grad_norm(lax.conv_general_dilated), 1)(x, k)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_no_swapped_convolution_is_compiled():
    """XLA swaps the operands of a conv whose kernel is larger than its input; on CPU that is a
    plain loop (~90× slower at VGG-19's 2×2 maps). Neither the forward nor the backward of ours is swapped."""
    x, k = jnp.ones((8, 2, 2, 16)), jnp.ones((3, 3, 16, 32))
    hlo = jax.jit(jax.grad(lambda x, k: _loss(conv_general_dilated, "SAME")(x, k)[0], (0, 1))).lower(x, k).compile().as_text()
    assert hlo.count("convolution(") == 3  # forward, input gradient, kernel gradient
    assert "rhs_reversal" not in hlo and "01fb_o01i" not in hlo


def test_other_convolutions_are_lax_itself():
    x = jnp.ones((2, 8, 8, 3))
    k = jnp.ones((3, 3, 3, 4))
    def call(conv, padding, strides):
        return lambda x, k: conv(x, k, strides, padding, dimension_numbers=_dn(x, k))

    for strides, padding in [((1, 1), "SAME"), ((2, 2), ((1, 1), (1, 1)))]:
        ours = jax.make_jaxpr(call(conv_general_dilated, padding, strides))(x, k)
        ref = jax.make_jaxpr(call(lax.conv_general_dilated, padding, strides))(x, k)
        assert str(ours) == str(ref)
    small = jnp.ones((2, 2, 2, 3))  # small, but strided: left to lax
    ours = jax.make_jaxpr(call(conv_general_dilated, "SAME", (2, 2)))(small, k)
    assert [e.primitive.name for e in ours.eqns] == ["conv_general_dilated"]


def test_models_and_factorize_use_it():
    model = cifar_vgg.vgg19(width=0.125, rngs=nnx.Rngs(0))
    assert all(conv.conv_general_dilated is conv_general_dilated for conv in model.convs)
    factorize(model, 0.25, cifar_vgg.KEEP_FULL_RANK)
    low = model.convs[15]
    assert isinstance(low, LowRankConv)
    assert low.first.conv_general_dilated is conv_general_dilated

    class Plain(nnx.Module):  # a user's own nnx.Conv keeps the user's convolution after the switch
        def __init__(self):
            self.conv = nnx.Conv(16, 16, (3, 3), rngs=nnx.Rngs(0))

    plain = Plain()
    factorize(plain, 0.25)
    assert plain.conv.first.conv_general_dilated is lax.conv_general_dilated
