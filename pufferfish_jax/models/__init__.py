"""Model zoo: vanilla models plus the declarative hybrid list that says which layers stay full rank."""

from pufferfish_jax.models import cifar_resnet, cifar_vgg, imagenet_resnet, transformer
from pufferfish_jax.models.registry import ARCHS, IMAGENET_ARCHS, ModelSpec, get_spec

__all__ = ["ARCHS", "IMAGENET_ARCHS", "ModelSpec", "get_spec", "cifar_resnet", "cifar_vgg", "imagenet_resnet", "transformer"]
