"""Name → (constructor, hybrid list): the one place a CLI looks a model up."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from flax import nnx

from pufferfish_jax.models import cifar_resnet, cifar_vgg


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a vanilla model and which of its layers Pufferfish keeps full rank."""

    name: str
    build: Callable[..., nnx.Module]
    keep_full_rank: Sequence[str]


ARCHS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", cifar_resnet.resnet18, cifar_resnet.KEEP_FULL_RANK),
    "vgg19": ModelSpec("vgg19", cifar_vgg.vgg19, cifar_vgg.KEEP_FULL_RANK),
}


def get_spec(name: str) -> ModelSpec:
    """The spec for ``name``; ``ValueError`` names the known architectures otherwise."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose one of: {', '.join(sorted(ARCHS))}")
    return ARCHS[name]
