"""CIFAR VGG-19 with BN (the ``chengyangfu/pytorch-vgg-cifar10`` layout used by Pufferfish).

16 bias-free 3×3 convs each followed by BN and ReLU, max-pools per ``CONFIG``,
then a classifier Dropout → 512→512 → ReLU → Dropout → 512→512 → ReLU → 512→classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pufferfish_jax.models.cifar_resnet import batch_norm, conv3x3

CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

KEEP_FULL_RANK = ("convs.[0-8]", "fc3")
"""Hybrid network (official code): conv1–conv9 and the last linear layer stay full rank;
conv10–conv16 and the two hidden 512×512 linear layers are factorized."""


class VGG(nnx.Module):
    """VGG with BN for 32×32 inputs; ``width`` scales every channel count and the hidden classifier width."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        scale = lambda c: max(1, int(round(c * width)))
        convs, bns, c_in = [], [], 3
        self.plan = tuple(v if v == "M" else scale(v) for v in CONFIG)
        for v in self.plan:
            if v == "M":
                continue
            convs.append(conv3x3(c_in, v, 1, dtype, rngs))  # conv13–16 see 2×2 maps (see cifar_resnet.conv)
            bns.append(batch_norm(v, dtype, rngs))
            c_in = v
        self.convs, self.bns = nnx.List(convs), nnx.List(bns)
        hidden = scale(512)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc1 = nnx.Linear(c_in, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for v in self.plan:
            if v == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = nnx.relu(self.bns[i](self.convs[i](x)))
                i += 1
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(self.dropout(x)))
        x = nnx.relu(self.fc2(self.dropout(x)))
        return self.fc3(x).astype(jnp.float32)


def vgg19(num_classes: int = 10, width: float = 1.0, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> VGG:
    """CIFAR VGG-19-BN: 20,560,330 trainable parameters at width 1.0 (8,370,634 in Pufferfish form)."""
    return VGG(num_classes, width, dtype=dtype, rngs=rngs)
