"""Datasets and input pipelines."""

from pufferfish_jax.data.cifar import Split, load_cifar10, load_npz
from pufferfish_jax.data.tfds_cifar10 import DatasetError

__all__ = ["DatasetError", "Split", "load_cifar10", "load_npz"]
