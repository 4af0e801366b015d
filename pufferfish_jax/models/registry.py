"""Name → (constructor, hybrid list): the one place a CLI looks a model up."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from flax import nnx

from pufferfish_jax.models import cifar_resnet, cifar_vgg, imagenet_resnet

CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)  # official Pufferfish CIFAR scripts, 0–255 scale


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a vanilla model and which of its layers Pufferfish keeps full rank, plus
    what its input looks like: ``image_size``² RGB images normalized by ``mean``/``std``
    (per channel, on the 0–255 scale of uint8 pixels), ``num_classes`` outputs."""

    name: str
    build: Callable[..., nnx.Module]
    keep_full_rank: Sequence[str]
    image_size: int = 32
    num_classes: int = 10
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD


ARCHS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", cifar_resnet.resnet18, cifar_resnet.KEEP_FULL_RANK),
    "vgg19": ModelSpec("vgg19", cifar_vgg.vgg19, cifar_vgg.KEEP_FULL_RANK),
}

IMAGENET_ARCHS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", imagenet_resnet.resnet50, imagenet_resnet.KEEP_FULL_RANK, image_size=224,
                          num_classes=1000, mean=imagenet_resnet.MEAN, std=imagenet_resnet.STD),
    "wrn50_2": ModelSpec("wrn50_2", imagenet_resnet.wide_resnet50_2, imagenet_resnet.KEEP_FULL_RANK, image_size=224,
                         num_classes=1000, mean=imagenet_resnet.MEAN, std=imagenet_resnet.STD),
}
"""The ImageNet models (``python -m experiments.imagenet --arch ...``); kept apart from ``ARCHS``
so that each command offers, and validates against, only the models of its own dataset."""


def get_spec(name: str, archs: dict[str, ModelSpec] = ARCHS) -> ModelSpec:
    """The spec for ``name`` in ``archs`` (the CIFAR models by default, or ``IMAGENET_ARCHS``);
    ``ValueError`` names the known architectures otherwise."""
    if name not in archs:
        raise ValueError(f"unknown arch {name!r}; choose one of: {', '.join(sorted(archs))}")
    return archs[name]
