"""CIFAR ResNet-18 / VGG-19: exact parameter and MAC counts (vanilla and Pufferfish), built abstractly,
plus real forward passes at a tiny width."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pufferfish_jax import (
    LowRankConv,
    LowRankLSTMCell,
    count_macs,
    count_params,
    factorize,
    grad_bytes,
    low_rank_init,
    plan,
)
from pufferfish_jax.models import ARCHS, cifar_resnet, cifar_vgg, get_spec

RESNET18_PARAMS, RESNET18_PUFFER_PARAMS = 11_173_962, 3_336_266
VGG19_PARAMS, VGG19_PUFFER_PARAMS = 20_560_330, 8_370_634
# MACs of one 32×32 example, conv + matmul only (derivations in _resnet18_macs/_vgg19_macs).
RESNET18_MACS, RESNET18_PUFFER_MACS = 555_422_720, 216_208_384
VGG19_MACS, VGG19_PUFFER_MACS = 398_660_608, 289_346_560
# The paper's / official code's ptflops figures (GMACs).
OFFICIAL_GMACS = {"resnet18": (0.5565, 0.2173), "vgg19": (0.3993, 0.2900)}

BUILDERS = {"resnet18": cifar_resnet.resnet18, "vgg19": cifar_vgg.vgg19}
KEEP = {"resnet18": cifar_resnet.KEEP_FULL_RANK, "vgg19": cifar_vgg.KEEP_FULL_RANK}


def abstract(arch, width=1.0):
    return nnx.eval_shape(lambda: BUILDERS[arch](width=width, rngs=nnx.Rngs(0)))


def abstract_pufferfish(arch, width=1.0):
    """The Pufferfish model (rank ratio 0.25, hybrid list), built and factorized abstractly."""
    return nnx.eval_shape(
        lambda: low_rank_init(lambda: BUILDERS[arch](width=width, rngs=nnx.Rngs(0)), 0.25, KEEP[arch])
    )


# ----------------------------------------------------------------------------- independent formulas


def _scaled(width):
    return lambda c: max(1, int(round(c * width)))


def _resnet18_layers(width):
    """(kind, c_in, c_out, k, out_hw, path) for every conv / linear of CIFAR ResNet-18."""
    s = _scaled(width)
    c = [s(64), s(128), s(256), s(512)]
    out = [("conv", 3, c[0], 3, 32, "conv1")]
    c_in, hw = c[0], 32
    for stage in range(4):
        for block in range(2):
            stride = 2 if (block == 0 and stage > 0) else 1
            hw //= stride
            p = f"layer{stage + 1}.{block}"
            out.append(("conv", c_in, c[stage], 3, hw, f"{p}.conv1"))
            out.append(("conv", c[stage], c[stage], 3, hw, f"{p}.conv2"))
            if stride != 1 or c_in != c[stage]:
                out.append(("conv", c_in, c[stage], 1, hw, f"{p}.shortcut.layers.0"))
            c_in = c[stage]
    out.append(("linear", c_in, 10, 1, 1, "linear"))
    return out


def _vgg19_layers(width):
    s = _scaled(width)
    out, c_in, hw, i = [], 3, 32, 0
    for v in cifar_vgg.CONFIG:
        if v == "M":
            hw //= 2
            continue
        out.append(("conv", c_in, s(v), 3, hw, f"convs.{i}"))
        c_in, i = s(v), i + 1
    h = s(512)
    out += [("linear", c_in, h, 1, 1, "fc1"), ("linear", h, h, 1, 1, "fc2"), ("linear", h, 10, 1, 1, "fc3")]
    return out


def _kernel_entries(c_in, c_out, k, path, ranks):
    """Weights of one layer's kernel: r·(fan_in + fan_out) when factorized, else fan_in·fan_out."""
    fan_in = k * k * c_in
    return ranks[path] * (fan_in + c_out) if path in ranks else fan_in * c_out


def _params(layers, pufferfish_ranks=None):
    """Kernels (factorized where ranked) + biases of linears + BN scale/shift after each conv."""
    ranks = pufferfish_ranks or {}
    total = 0
    for kind, c_in, c_out, k, _, path in layers:
        total += _kernel_entries(c_in, c_out, k, path, ranks)
        total += c_out if kind == "linear" else 2 * c_out
    return total


def _macs(layers, pufferfish_ranks=None):
    ranks = pufferfish_ranks or {}
    total = 0
    for _, c_in, c_out, k, hw, path in layers:
        total += hw * hw * _kernel_entries(c_in, c_out, k, path, ranks)
    return total


LAYERS = {"resnet18": _resnet18_layers, "vgg19": _vgg19_layers}
EXPECTED = {
    "resnet18": (RESNET18_PARAMS, RESNET18_PUFFER_PARAMS, RESNET18_MACS, RESNET18_PUFFER_MACS, 14),
    "vgg19": (VGG19_PARAMS, VGG19_PUFFER_PARAMS, VGG19_MACS, VGG19_PUFFER_MACS, 9),
}


def _official_ranks(arch, width=1.0):
    """Pufferfish ranks: int(min(c_out, k·k·c_in) / 4) for every layer outside the hybrid list."""
    ranks = {}
    for _, c_in, c_out, k, _, path in LAYERS[arch](width):
        keep = {
            "resnet18": path in ("conv1", "linear") or path.startswith("layer1.0.") or "shortcut" in path,
            "vgg19": path in [f"convs.{i}" for i in range(9)] + ["fc3"],
        }[arch]
        if not keep:
            ranks[path] = int(min(c_out, k * k * c_in) / 4)
    return ranks


def test_independent_formulas_give_the_published_counts():
    for arch, (params, puffer_params, macs, puffer_macs, n) in EXPECTED.items():
        layers, ranks = LAYERS[arch](1.0), _official_ranks(arch)
        assert len(ranks) == n
        assert _params(layers) == params
        assert _params(layers, ranks) == puffer_params
        assert _macs(layers) == macs
        assert _macs(layers, ranks) == puffer_macs


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("arch", ["resnet18", "vgg19"])
def test_param_counts(arch):
    params, puffer_params, _, _, n = EXPECTED[arch]
    model = abstract(arch)
    assert count_params(model) == params
    layers = plan(model, 0.25, KEEP[arch])
    assert len(layers) == n
    assert {l.path: l.rank for l in layers} == _official_ranks(arch)
    assert count_params(model) - sum(l.params_saved for l in layers) == puffer_params
    puffer = abstract_pufferfish(arch)
    assert count_params(puffer) == puffer_params
    # BN running statistics are not trainable parameters.
    stats = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    assert stats == 2 * sum(c_out for kind, _, c_out, *_ in LAYERS[arch](1.0) if kind == "conv")


@pytest.mark.parametrize("arch", ["resnet18", "vgg19"])
@pytest.mark.parametrize("width", [0.5, 0.125, 0.0625])
def test_param_counts_at_other_widths(arch, width):
    layers = LAYERS[arch](width)
    model = abstract(arch, width)
    assert count_params(model) == _params(layers)
    puffer = abstract_pufferfish(arch, width)
    # At small widths some layers are no longer worth splitting; plan and the model agree.
    ranks = {l.path: l.rank for l in plan(model, 0.25, KEEP[arch])}
    assert count_params(puffer) == _params(layers, ranks)


def test_real_svd_switch_on_the_largest_full_width_layer():
    """The real SVD switch at full scale, on ResNet-18's largest conv (4608×512, rank 128).

    The whole 14-layer switch costs ~5 s of CPU on this machine; its parameter count is checked
    abstractly above. Values come from numpy, so there are no init compiles."""
    model = abstract("resnet18")
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            if path[-1] == "kernel":
                value = rng.standard_normal(var.shape, np.float32) / math.sqrt(math.prod(var.shape[:-1]))
            else:
                value = np.ones(var.shape, np.float32) if path[-1] in ("scale", "var") else np.zeros(var.shape, np.float32)
            var.set_value(jnp.asarray(value))
    w = np.asarray(model.layer4[1].conv2.kernel[...], np.float64).reshape(4608, 512)
    everything_else = [l.path for l in plan(model, 0.25) if l.path != "layer4.1.conv2"]
    layers = factorize(model, 0.25, everything_else)
    assert [(l.path, l.fan_in, l.fan_out, l.rank) for l in layers] == [("layer4.1.conv2", 4608, 512, 128)]
    assert count_params(model) == RESNET18_PARAMS - (4608 * 512 - 128 * (4608 + 512))
    assert grad_bytes(model) == 4 * count_params(model)
    conv = model.layer4[1].conv2
    assert type(conv) is LowRankConv and conv.rank == 128
    a = np.asarray(conv.first.kernel[...], np.float64).reshape(4608, 128)
    b = np.asarray(conv.second.kernel[...], np.float64).reshape(128, 512)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    # ‖W − AB‖² is the sum of the 384 smallest σ², the eigenvalues of the 512×512 Gram matrix
    # (a float64 eigvalsh: much cheaper here than a 4608×512 SVD).
    eig = np.linalg.eigvalsh(w.T @ w)
    np.testing.assert_allclose(np.linalg.norm(w - a @ b), math.sqrt(eig[:384].sum()), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(a @ b), math.sqrt(eig[384:].sum()), rtol=1e-4)


# ----------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("arch", ["resnet18", "vgg19"])
def test_macs(arch):
    _, _, macs, puffer_macs, _ = EXPECTED[arch]
    assert count_macs(abstract(arch), (1, 32, 32, 3)) == macs
    assert count_macs(abstract(arch), (4, 32, 32, 3)) == 4 * macs  # input_shape includes the batch
    assert count_macs(abstract_pufferfish(arch), (1, 32, 32, 3)) == puffer_macs

    # Against the official ptflops figures: ptflops also counts BN, ReLU, pooling and additions,
    # which factorizing does not change, so ours is lower by the same small amount for both models.
    official, official_puffer = (g * 1e9 for g in OFFICIAL_GMACS[arch])
    gap, gap_puffer = official - macs, official_puffer - puffer_macs
    assert 0 < gap < 0.006 * official and 0 < gap_puffer < 0.006 * official_puffer
    assert abs(gap - gap_puffer) <= 1e5  # the figures are rounded to 0.0001 G = 1e5 MACs
    assert abs(macs - official) / official < 0.005


def test_macs_scale_with_width():
    for arch in ("resnet18", "vgg19"):
        for width in (0.5, 0.125):
            layers = LAYERS[arch](width)
            assert count_macs(abstract(arch, width), (1, 32, 32, 3)) == _macs(layers)


class _Recurrent(nnx.Module):
    def __init__(self, cell):
        self.rnn = nnx.RNN(cell)

    def __call__(self, x):
        return self.rnn(x)


def test_macs_count_every_scan_step():
    # An RNN is a scan over time: its cell's MACs count once per step.
    t, d, h = 7, 5, 8
    vanilla = nnx.eval_shape(lambda: _Recurrent(nnx.LSTMCell(d, h, rngs=nnx.Rngs(0))))
    assert count_macs(vanilla, (1, t, d)) == t * (4 * d * h + 4 * h * h)
    assert count_macs(vanilla, (3, t, d)) == 3 * t * (4 * d * h + 4 * h * h)
    low = nnx.eval_shape(lambda: _Recurrent(LowRankLSTMCell(d, h, rngs=nnx.Rngs(0))))  # rank 2
    assert count_macs(low, (1, t, d)) == t * (4 * (d * 2 + 2 * h) + 4 * (h * 2 + 2 * h))


class _Branchy(nnx.Module):
    def __init__(self):
        self.big = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
        self.small = nnx.Linear(16, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return jax.lax.cond(x.sum() > 0, lambda v: self.big(v)[:, :4], lambda v: self.small(v), x)


def test_macs_count_one_cond_branch():
    # Only one branch of a cond runs: the costliest is counted, not the sum of both.
    assert count_macs(nnx.eval_shape(_Branchy), (2, 16)) == 2 * 16 * 32


# ----------------------------------------------------------------------------- gradient bytes


@pytest.mark.parametrize("arch", ["resnet18", "vgg19"])
def test_grad_bytes(arch):
    params, puffer_params, *_ = EXPECTED[arch]
    model, puffer = abstract(arch), abstract_pufferfish(arch)
    assert grad_bytes(model) == 4 * params
    assert grad_bytes(puffer) == 4 * puffer_params
    assert grad_bytes(puffer, bytes_per_entry=2) == 2 * puffer_params


# ----------------------------------------------------------------------------- shapes and width


def test_width_multiplier_scales_channels():
    r = abstract("resnet18", 0.5)
    assert r.conv1.kernel.shape == (3, 3, 3, 32)
    assert r.layer2[0].conv1.kernel.shape == (3, 3, 32, 64)
    assert r.layer2[0].shortcut.layers[0].kernel.shape == (1, 1, 32, 64)
    assert r.layer4[1].conv2.kernel.shape == (3, 3, 256, 256)
    assert r.linear.kernel.shape == (256, 10)
    assert r.layer4[1].bn2.mean.shape == (256,)
    v = abstract("vgg19", 0.25)
    assert [c.kernel.shape[-1] for c in v.convs] == [16, 16, 32, 32] + [64] * 4 + [128] * 8
    assert v.fc1.kernel.shape == (128, 128) and v.fc3.kernel.shape == (128, 10)
    assert len(v.convs) == 16 and len(v.bns) == 16
    tiny = abstract("resnet18", 0.01)  # every stage keeps at least one channel
    assert tiny.conv1.kernel.shape == (3, 3, 3, 1) and tiny.linear.kernel.shape == (5, 10)


def test_registry():
    assert set(ARCHS) == {"resnet18", "vgg19"}
    assert get_spec("resnet18").keep_full_rank == cifar_resnet.KEEP_FULL_RANK
    assert get_spec("vgg19").build is cifar_vgg.vgg19
    with pytest.raises(ValueError, match="resnet18"):
        get_spec("resnet50")


@nnx.jit
def _forward(model, x):
    return model(x)


@pytest.mark.parametrize("arch", ["resnet18", "vgg19"])
def test_forward_tiny_width(arch):
    # A real init; an rbg key only to keep this test's XLA compiles short on CPU.
    model = BUILDERS[arch](width=0.125, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
    stats_before = [np.asarray(v[...]) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    model.train()
    y_train = _forward(model, x)
    assert y_train.shape == (4, 10) and y_train.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y_train)))
    stats_after = [np.asarray(v[...]) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    assert any(not np.array_equal(a, b) for a, b in zip(stats_before, stats_after))  # BN updated

    model.eval()
    y1, y2 = _forward(model, x), _forward(model, x)
    assert y1.shape == (4, 10) and bool(jnp.all(jnp.isfinite(y1)))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))  # eval is deterministic
    stats_eval = [np.asarray(v[...]) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    assert all(np.array_equal(a, b) for a, b in zip(stats_after, stats_eval))  # and leaves BN alone
    assert float(jnp.std(y1)) > 0  # logits differ across classes / examples
