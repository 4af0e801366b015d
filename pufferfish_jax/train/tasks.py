"""Losses of the tasks the trainer runs; each returns the mean loss and metric sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pufferfish_jax.data.cifar import MEAN, STD


def image_classification(label_smoothing: float = 0.0):
    """Cross-entropy on uint8 NHWC images normalized on device; metrics: ``loss_sum``, ``correct``, ``count``.

    A ``mask`` in the batch (padded evaluation batches) zeroes the padding.
    """
    mean, std = jnp.asarray(MEAN), jnp.asarray(STD)

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array]):
        x = (batch["image"].astype(jnp.float32) - mean) / std
        logits = model(x).astype(jnp.float32)
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing) if label_smoothing else jax.nn.one_hot(labels, logits.shape[-1])
        per_example = optax.softmax_cross_entropy(logits, targets)
        mask = batch.get("mask", jnp.ones_like(per_example))
        count = mask.sum()
        loss = (per_example * mask).sum() / jnp.maximum(count, 1.0)
        correct = ((jnp.argmax(logits, -1) == labels) * mask).sum()
        return loss, {"loss_sum": (per_example * mask).sum(), "correct": correct, "count": count}

    return loss_fn
