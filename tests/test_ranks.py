"""The rank rule: r = int(min(fan_in, fan_out)·ratio), kept full rank when r < 1 or nothing is saved."""

import math

import pytest

from pufferfish_jax import low_rank, validate_rank_ratio
from pufferfish_jax.models import cifar_resnet, cifar_vgg
from pufferfish_jax.ranks import path_matches, ratio_for


@pytest.mark.parametrize(
    "fan_in, fan_out, ratio, expected",
    [
        (3 * 3 * 64, 64, 0.25, 16),  # ResNet-18 layer1 3×3 conv
        (3 * 3 * 512, 512, 0.25, 128),  # ResNet-18 layer4 3×3 conv
        (3 * 3 * 64, 128, 0.25, 32),  # layer2.0.conv1 (stride 2)
        (3 * 3 * 128, 128, 0.25, 32),
        (3 * 3 * 256, 256, 0.25, 64),
        (512, 512, 0.25, 128),  # VGG fc1/fc2
        (1500, 1500 * 4, 0.25, 375),  # LSTM gate stack, 1500 hidden
        (576, 64, 0.5, 32),
        (576, 64, 0.1, 6),  # int(6.4)
        (100, 10, 0.3, 3),
        (10, 100, 0.3, 3),  # symmetric in fan_in / fan_out
    ],
)
def test_low_rank_examples(fan_in, fan_out, ratio, expected):
    assert low_rank(fan_in, fan_out, ratio) == expected


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 64), (576, 64), (64, 576), (4608, 512), (27, 64), (512, 10)])
def test_ratio_one_never_factorizes(shape):
    assert low_rank(*shape, 1.0) is None


@pytest.mark.parametrize(
    "fan_in, fan_out, ratio",
    [
        (3, 3, 0.25),  # int(0.75) = 0: rank < 1
        (27, 3, 0.25),  # int(0.75) = 0
        (1, 100, 0.5),  # int(0.5) = 0
        (4, 4, 0.5),  # r = 2: 2·(4+4) = 16, not fewer than 4·4 = 16
        (10, 10, 0.5),  # r = 5: 5·20 = 100 = 10·10, no saving
        (10, 10, 0.9),  # r = 9: 9·20 = 180 > 100
        (2, 2, 0.5),  # r = 1: 1·4 = 2·2
    ],
)
def test_tiny_or_unprofitable_layers_stay_full_rank(fan_in, fan_out, ratio):
    assert low_rank(fan_in, fan_out, ratio) is None


def test_saving_boundary():
    # r·(fan_in+fan_out) < fan_in·fan_out is strict: equality keeps the layer.
    assert low_rank(4, 4, 0.5) is None  # 2·8 == 16
    assert low_rank(4, 4, 0.25) == 1  # 1·8 < 16
    assert low_rank(100, 2, 0.5) == 1  # 1·102 < 200
    assert low_rank(3, 2, 0.5) == 1  # 1·5 < 6
    assert low_rank(2, 2, 0.5) is None  # 1·4 == 4


def _official_rank(c_in, c_out, k, rank_factor):
    """Pufferfish's official code: ``int(min(c_out, c_in*k*k) / rank_factor)``."""
    return int(min(c_out, c_in * k * k) / rank_factor)


@pytest.mark.parametrize("rank_factor", [2, 3, 4, 8])
def test_matches_official_formula_on_conv_grid(rank_factor):
    channels = (3, 16, 32, 64, 96, 128, 200, 256, 512)
    checked = 0
    for c_in in channels:
        for c_out in channels:
            for k in (1, 3, 5):
                fan_in, fan_out = c_in * k * k, c_out
                official = _official_rank(c_in, c_out, k, rank_factor)
                ours = low_rank(fan_in, fan_out, 1.0 / rank_factor)
                if official >= 1 and official * (fan_in + fan_out) < fan_in * fan_out:
                    assert ours == official, (c_in, c_out, k)
                    checked += 1
                else:
                    assert ours is None, (c_in, c_out, k)
    assert checked > 150  # the grid mostly holds layers worth splitting


def test_every_factorized_resnet_and_vgg_conv_has_the_official_rank():
    # 3×3 convs of ResNet-18 / VGG-19 (c_in, c_out), rank factor 4.
    for c_in, c_out in [(64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]:
        assert low_rank(9 * c_in, c_out, 0.25) == _official_rank(c_in, c_out, 3, 4) == c_out // 4


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf"), "abc", None, [0.5]])
def test_validate_rank_ratio_rejects(bad):
    with pytest.raises(ValueError):
        validate_rank_ratio(bad)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "abc"])
def test_low_rank_rejects_bad_ratio(bad):
    with pytest.raises(ValueError):
        low_rank(576, 64, bad)


@pytest.mark.parametrize("good, value", [(1, 1.0), (1.0, 1.0), (0.25, 0.25), ("0.5", 0.5), (1e-9, 1e-9)])
def test_validate_rank_ratio_accepts(good, value):
    out = validate_rank_ratio(good)
    assert isinstance(out, float) and out == value


@pytest.mark.parametrize(
    "path, patterns, expected",
    [
        ("layer1.0.conv1", ["layer1.0"], True),  # a pattern covers the module's children
        ("layer1.0", ["layer1.0"], True),
        ("layer1.0.shortcut.layers.0", ["layer1.0"], True),
        ("layer1.01", ["layer1.0"], False),  # prefix is by dotted component, not by character
        ("layer1.01.conv1", ["layer1.0"], False),
        ("layer1.1.conv1", ["layer1.0"], False),
        ("xlayer1.0.conv1", ["layer1.0"], False),
        ("conv1", ["conv1"], True),  # ResNet stem
        ("layer1.1.conv1", ["conv1"], False),  # ... but not every conv1 deeper in the net
        ("layer2.0.shortcut.layers.0", ["*shortcut*"], True),
        ("layer2.0.conv1", ["*shortcut*"], False),
        ("convs.8", ["convs.[0-8]"], True),
        ("convs.0", ["convs.[0-8]"], True),
        ("convs.9", ["convs.[0-8]"], False),
        ("convs.10", ["convs.[0-8]"], False),
        ("convs.18", ["convs.[0-8]"], False),
        ("linear", ["linear"], True),
        ("linear2", ["linear"], False),
        ("fc3", ["fc1", "fc3"], True),
        ("fc2", ["fc1", "fc3"], False),
        ("Conv1", ["conv1"], False),  # case-sensitive
        ("anything", [], False),
        ("a.b.c", ["a.*.c"], True),
        ("a.b.c", ["*"], True),
    ],
)
def test_path_matches(path, patterns, expected):
    assert path_matches(path, patterns) is expected


def test_hybrid_lists_select_the_official_layers():
    resnet_convs = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]
    kept = [p for p in resnet_convs if path_matches(p, cifar_resnet.KEEP_FULL_RANK)]
    assert kept == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert path_matches("layer3.0.shortcut.layers.0", cifar_resnet.KEEP_FULL_RANK)
    assert path_matches("linear", cifar_resnet.KEEP_FULL_RANK)

    vgg = [f"convs.{i}" for i in range(16)] + ["fc1", "fc2", "fc3"]
    kept = [p for p in vgg if path_matches(p, cifar_vgg.KEEP_FULL_RANK)]
    assert kept == [f"convs.{i}" for i in range(9)] + ["fc3"]


def test_ratio_for_overrides():
    overrides = {"layer4.*": 0.5, "layer4.1.conv2": 0.125, "fc?": 1.0}
    assert ratio_for("layer3.0.conv1", 0.25, overrides) == 0.25
    assert ratio_for("layer4.0.conv1", 0.25, overrides) == 0.5
    # The first matching pattern wins, in the mapping's order.
    assert ratio_for("layer4.1.conv2", 0.25, overrides) == 0.5
    assert ratio_for("layer4.1.conv2", 0.25, {"layer4.1.conv2": 0.125, "layer4.*": 0.5}) == 0.125
    assert ratio_for("fc1", 0.25, overrides) == 1.0
    # A pattern naming a module covers its children, as in keep_full_rank.
    assert ratio_for("layer2.0.conv1", 0.25, {"layer2": 0.75}) == 0.75
    assert ratio_for("layer20.conv1", 0.25, {"layer2": 0.75}) == 0.25
    assert ratio_for("x", 0.25, None) == 0.25
    assert ratio_for("x", 0.25, {}) == 0.25
    assert isinstance(ratio_for("fc1", 0.25, {"fc1": 1}), float)


@pytest.mark.parametrize("bad", [0.0, 2.0, float("nan"), "abc"])
def test_ratio_for_validates_matching_override(bad):
    with pytest.raises(ValueError):
        ratio_for("fc1", 0.25, {"fc1": bad})
    # A non-matching override is not consulted.
    assert ratio_for("fc2", 0.25, {"fc1": bad}) == 0.25


def test_override_of_one_keeps_layer():
    fan_in, fan_out = 9 * 256, 256
    assert low_rank(fan_in, fan_out, ratio_for("layer3.0.conv1", 0.25, {"layer3.*": 1.0})) is None
    assert low_rank(fan_in, fan_out, ratio_for("layer3.0.conv1", 0.25, {"layer3.*": 0.5})) == 128


def test_rank_is_floor_not_round():
    # int() truncates: 0.25·(3·3·3=27) = 6.75 → 6, and 0.5·(2·7) = 7.
    assert low_rank(27, 64, 0.25) == 6
    assert low_rank(63, 14, 0.5) == 7
    assert all(low_rank(m, 10 * m, 0.25) == math.floor(m / 4) for m in range(8, 200))
