"""Mixed precision (``--dtype bfloat16``): convolutions and matmuls run in bf16, while parameters,
optimizer state, the loss and BN statistics stay float32; the SVD switch keeps the layer dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.bench_step import mac_eqns
from pufferfish_jax import LowRankConv, factorize
from pufferfish_jax.models import IMAGENET_ARCHS, cifar_resnet, get_spec, imagenet_resnet
from pufferfish_jax.models.cifar_resnet import batch_norm
from pufferfish_jax.parallel import data_mesh, global_batch, place_state
from pufferfish_jax.reducers import all_reduce
from pufferfish_jax.train.state import init_state, split_model
from pufferfish_jax.train.steps import make_train_step
from pufferfish_jax.train.tasks import image_classification

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


def _floats(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_batch_norm_statistics_and_normalization_stay_float32():
    rng = np.random.default_rng(0)
    # Values near 100 (bf16 spacing 0.5 there) with a small spread: bf16 statistics would be useless.
    x = jnp.asarray(100 + 0.5 * rng.standard_normal((16, 4, 4, 8)), jnp.bfloat16).astype(jnp.float32)
    mean64 = np.asarray(x, np.float64).mean((0, 1, 2))
    var64 = np.asarray(x, np.float64).var((0, 1, 2))

    bn = batch_norm(8, jnp.bfloat16, nnx.Rngs(0))
    y = bn(x.astype(jnp.bfloat16))
    assert y.dtype == BF16 and bn.mean.dtype == F32 and bn.var.dtype == F32 and bn.scale.dtype == F32
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean64, rtol=1e-5)  # momentum 0.9 from 0
    # fp32 E[x²] - E[x]² near 100 loses ~1e-3 of var to cancellation; in bf16 (spacing 64 at 10⁴) nothing would be left.
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var64, atol=2e-4)
    ref = (np.asarray(x, np.float64) - mean64) / np.sqrt(var64 + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.02, rtol=0.01)  # bf16 output rounding only

    # Evaluation normalizes with the float32 running statistics; nnx's default would round them to bf16.
    bn.mean[...] = jnp.asarray(mean64, jnp.float32)
    bn.var[...] = jnp.asarray(var64, jnp.float32)
    bn.eval()
    ours = np.abs(np.asarray(bn(x.astype(jnp.bfloat16)), np.float32) - ref).max()
    default = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16, use_running_average=True, rngs=nnx.Rngs(0))
    default.mean[...], default.var[...] = bn.mean[...], bn.var[...]
    theirs = np.abs(np.asarray(default(x.astype(jnp.bfloat16)), np.float32) - ref).max()
    assert ours < 0.05 < theirs


@pytest.fixture(scope="module")
def cifar_batch(cifar_splits):
    train, _ = cifar_splits
    idx = np.random.default_rng(0).permutation(len(train))[:16]
    return {"image": train.images[idx], "label": train.labels[idx]}


def _step_setup(dtype):
    model = get_spec("resnet18").build(width=0.125, dtype=dtype, rngs=nnx.Rngs(0))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(decay=0.9))
    mesh = data_mesh()
    graphdef, _, params, rest = split_model(model)
    step = make_train_step(graphdef, image_classification(dtype=dtype), tx, all_reduce(), mesh)
    return step, place_state(init_state(params, rest, tx, all_reduce(), mesh.size), mesh), mesh


def test_bf16_train_step_computes_in_bf16_with_float32_master_state(cifar_batch):
    step, state, mesh = _step_setup(jnp.bfloat16)
    batch = global_batch(cifar_batch, mesh)
    lr = jnp.asarray(0.1, jnp.float32)
    convs = [e for e in mac_eqns(jax.make_jaxpr(step.__wrapped__)(state, batch, lr).jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == BF16 for e in convs for v in e.invars)  # forward and backward convs in bf16

    before = jax.tree.map(np.asarray, state.params)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, lr)
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    for tree in (state.params, state.opt_state, state.rest):
        assert all(x.dtype == F32 for x in _floats(tree))  # master weights, momentum, BN statistics
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
    assert min(moved) > 0  # fp32 updates are not lost to bf16 rounding

    # The float32 twin (same init) gives nearly the same loss on the first batch.
    twin = get_spec("resnet18").build(width=0.125, rngs=nnx.Rngs(0))
    loss32, _, _ = nnx.jit(image_classification())(twin, cifar_batch)
    assert abs(float(loss32) - losses[0]) < 0.02 * abs(losses[0])


def test_factorize_keeps_bf16_compute_and_float32_parameters(cifar_batch):
    x = jnp.asarray(cifar_batch["image"][:4], jnp.float32) / 255.0
    twins = {dtype: cifar_resnet.resnet18(width=0.125, dtype=dtype, rngs=nnx.Rngs(0)) for dtype in (jnp.float32, jnp.bfloat16)}
    for model in twins.values():
        assert factorize(model, 0.25, cifar_resnet.KEEP_FULL_RANK)
    model = twins[jnp.bfloat16]
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LowRankConv):
            for factor in (module.first, module.second):
                assert factor.dtype == BF16 and factor.param_dtype == F32 and factor.kernel.dtype == F32
    # The SVD runs on the float32 weights either way: identical factors.
    for a, b in zip(jax.tree.leaves(nnx.state(twins[jnp.float32], nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        assert b.dtype == F32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    graphdef, state = nnx.split(model)
    convs = [e for e in mac_eqns(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr)
             if e.primitive.name == "conv_general_dilated"]
    assert len(convs) > 20 and all(v.aval.dtype == BF16 for e in convs for v in e.invars)
    ref, out = np.asarray(twins[jnp.float32](x)), np.asarray(model(x))  # train mode: batch statistics
    assert out.dtype == np.float32
    assert 0 < np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05


def test_imagenet_resnet_bf16_computes_in_bf16_close_to_float32():
    spec = IMAGENET_ARCHS["resnet50"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)), jnp.float32)
    # The whole network, abstractly (a concrete random init of ResNet-50 costs tens of seconds on CPU).
    model = nnx.eval_shape(lambda: spec.build(num_classes=10, width=0.125, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert all(v.dtype == F32 for v in _floats(nnx.state(model)))  # parameters and BN statistics
    graphdef, state = nnx.split(model)
    forward = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert forward.out_avals[0].dtype == F32  # logits
    convs = [e for e in mac_eqns(forward.jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 53 and all(v.aval.dtype == BF16 for e in convs for v in e.invars)
    # One bottleneck (with its downsample) in bf16 is within bf16 rounding of float32; same fp32 init.
    # (A whole randomly initialized ResNet-50 on a batch of 4 amplifies any perturbation, bf16's or
    # not, ~1.3x per block.)
    h = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 16)), jnp.float32)
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        block = imagenet_resnet.Bottleneck(16, 8, 8, 2, dtype=dtype, rngs=nnx.Rngs(0))
        out[dtype] = np.asarray(block(h.astype(dtype)), np.float32)  # train mode: batch statistics
        assert block.downsample is not None and block.bn3.mean.dtype == F32
    rel = np.linalg.norm(out[jnp.bfloat16] - out[jnp.float32]) / np.linalg.norm(out[jnp.float32])
    assert 0 < rel < 0.03
