"""ImageNet ResNet-50 and Wide ResNet-50-2 in the torchvision layout (He et al. 2016; Zagoruyko &
Komodakis 2016), as the Pufferfish ImageNet experiments use them.

7×7/2 stem conv + BN + ReLU + 3×3/2 max-pool, Bottleneck blocks ``[3, 4, 6, 3]`` (1×1 reduce,
3×3 with the stage's stride — the "ResNet v1.5" placement —, 1×1 expand ×4), a 1×1/s conv + BN
downsample on the first block of each stage, no conv biases, global average pool, linear →
1000 classes. Wide ResNet-50-2 doubles the bottleneck width (the 3×3 convs), not the block outputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pufferfish_jax.models.cifar_resnet import batch_norm, conv

KEEP_FULL_RANK = ("conv1", "layer1", "layer2", "layer3", "fc")
"""Hybrid network of the official Pufferfish ImageNet code: the stem and layer1–layer3 stay full
rank, every conv of layer4 (the three convs of each bottleneck and the 1×1 downsample) is
factorized, the final linear layer stays full rank."""

NUM_CLASSES = 1000
# torchvision's normalization, on the 0–255 scale the pipeline delivers (uint8 images).
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class Bottleneck(nnx.Module):
    """1×1 conv ``c_in → width``, 3×3 conv ``width → width`` (stride here), 1×1 conv
    ``width → 4·planes``, each with BN; ReLU after the first two and after the residual sum."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, width: int, stride: int, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        c_out = planes * self.expansion
        self.conv1 = conv(c_in, width, 1, 1, dtype, rngs)
        self.bn1 = batch_norm(width, dtype, rngs)
        self.conv2 = conv(width, width, 3, stride, dtype, rngs)
        self.bn2 = batch_norm(width, dtype, rngs)
        self.conv3 = conv(width, c_out, 1, 1, dtype, rngs)
        self.bn3 = batch_norm(c_out, dtype, rngs)
        if stride != 1 or c_in != c_out:
            self.downsample = nnx.Sequential(conv(c_in, c_out, 1, stride, dtype, rngs), batch_norm(c_out, dtype, rngs))
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(nnx.Module):
    """Bottleneck ResNet for 224×224 inputs (any size ≥ 32 works: the head pools globally).

    Args:
      stage_sizes: bottlenecks per stage (``[3, 4, 6, 3]`` for the 50-layer nets).
      width_per_group: bottleneck width of the first stage (64; 128 for Wide ResNet-50-2).
      num_classes: outputs of the final linear layer.
      width: multiplies every channel count (1.0 = the paper's network; small values for tests).
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters and BN
        statistics stay float32, logits are returned in float32.
    """

    def __init__(
        self,
        stage_sizes: Sequence[int] = (3, 4, 6, 3),
        width_per_group: int = 64,
        num_classes: int = NUM_CLASSES,
        width: float = 1.0,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        scale = lambda c: max(1, int(round(c * width)))  # noqa: E731
        self.dtype = dtype
        stem = scale(64)
        self.conv1 = conv(3, stem, 7, 2, dtype, rngs)
        self.bn1 = batch_norm(stem, dtype, rngs)
        c_in = stem
        for i, blocks in enumerate(stage_sizes):
            planes, bottleneck = scale(64 * 2**i), scale(width_per_group * 2**i)
            stage = []
            for b in range(blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                stage.append(Bottleneck(c_in, planes, bottleneck, stride, dtype=dtype, rngs=rngs))
                c_in = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.num_stages = len(stage_sizes)
        self.fc = nnx.Linear(c_in, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        # PyTorch pads max-pooling with -inf, as flax does.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        return self.fc(x).astype(jnp.float32)


def resnet50(num_classes: int = NUM_CLASSES, width: float = 1.0, *, dtype: Any = jnp.float32,
             rngs: nnx.Rngs) -> ImageNetResNet:
    """ResNet-50: 25,557,032 trainable parameters (15,202,344 in Pufferfish form, ranks 0.25)."""
    return ImageNetResNet((3, 4, 6, 3), 64, num_classes, width, dtype=dtype, rngs=rngs)


def wide_resnet50_2(num_classes: int = NUM_CLASSES, width: float = 1.0, *, dtype: Any = jnp.float32,
                    rngs: nnx.Rngs) -> ImageNetResNet:
    """Wide ResNet-50-2: 68,883,240 trainable parameters (40,047,400 in Pufferfish form, ranks 0.25)."""
    return ImageNetResNet((3, 4, 6, 3), 128, num_classes, width, dtype=dtype, rngs=rngs)

