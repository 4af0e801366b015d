"""CIFAR ResNet-18 (He et al. 2016, the ``kuangliu/pytorch-cifar`` layout used by Pufferfish).

3×3 stem conv + BN, BasicBlocks ``[2, 2, 2, 2]`` of widths 64–512, 1×1 conv + BN
shortcuts, no conv biases, global average pool, linear 512 → classes. The
official Pufferfish code drops the stem BN; we keep it (so 128 more parameters).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pufferfish_jax.convolution import conv_general_dilated

KEEP_FULL_RANK = ("conv1", "layer1.0", "*shortcut*", "linear")
"""Hybrid network (§3.2, official code): the stem, the first block of layer1,
every 1×1 shortcut and the classifier stay full rank; the other 7 blocks' 3×3 convs are factorized."""

conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(c_in: int, c_out: int, k: int, stride: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    """A bias-free ``k×k`` conv with ``k // 2`` padding: every conv of the project's CNNs but the
    CIFAR ResNet shortcuts. ``conv_general_dilated`` keeps XLA:CPU off its slow path on maps
    smaller than the kernel (VGG-19's 2×2 maps)."""
    return nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=k // 2, use_bias=False,
                    kernel_init=conv_init, dtype=dtype, conv_general_dilated=conv_general_dilated, rngs=rngs)


def conv3x3(c_in: int, c_out: int, stride: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    return conv(c_in, c_out, 3, stride, dtype, rngs)


def _input_to_compute_dtype(arrays: tuple, *, dtype: Any) -> tuple:
    """BN's ``promote_dtype`` under mixed precision: only the input goes to the compute dtype.

    nnx's default casts the running mean/var, scale and bias to ``dtype`` as well, so a bf16
    model would normalize with bf16 statistics at evaluation. Left in float32, the batch
    statistics are computed in float32 and ``(x - mean)·rsqrt(var + eps)·scale + bias`` is
    evaluated in float32; only the result is cast to ``dtype``.
    """
    x, *rest = arrays
    return (x if dtype is None else jnp.asarray(x, dtype), *rest)


def batch_norm(c: int, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # PyTorch's BN momentum 0.1 is flax's 0.9; statistics stay fp32 even under bf16 compute.
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, promote_dtype=_input_to_compute_dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3×3 conv–BN pairs with a residual connection; a 1×1 conv–BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.conv1 = conv3x3(c_in, c_out, stride, dtype, rngs)
        self.bn1 = batch_norm(c_out, dtype, rngs)
        self.conv2 = conv3x3(c_out, c_out, 1, dtype, rngs)
        self.bn2 = batch_norm(c_out, dtype, rngs)
        if stride != 1 or c_in != c_out:
            self.shortcut = nnx.Sequential(
                nnx.Conv(c_in, c_out, (1, 1), strides=stride, use_bias=False, kernel_init=conv_init, dtype=dtype, rngs=rngs),
                batch_norm(c_out, dtype, rngs),
            )
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nnx.Module):
    """ResNet for 32×32 inputs; ``width`` scales every channel count (1.0 = the paper's 64–512)."""

    def __init__(
        self,
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: float = 1.0,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.dtype = dtype
        self.conv1 = conv3x3(3, widths[0], 1, dtype, rngs)
        self.bn1 = batch_norm(widths[0], dtype, rngs)
        c_in = widths[0]
        for i, (blocks, c_out) in enumerate(zip(stage_sizes, widths)):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(c_in, c_out, 2 if (b == 0 and i > 0) else 1, dtype=dtype, rngs=rngs))
                c_in = c_out
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.num_stages = len(stage_sizes)
        self.linear = nnx.Linear(c_in, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.linear(x).astype(jnp.float32)


def resnet18(num_classes: int = 10, width: float = 1.0, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> CifarResNet:
    """CIFAR ResNet-18: 11,173,962 trainable parameters at width 1.0 (3,336,266 in Pufferfish form)."""
    return CifarResNet((2, 2, 2, 2), num_classes, width, dtype=dtype, rngs=rngs)
