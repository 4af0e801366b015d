"""Losses of the tasks the trainer runs; each returns the mean loss and metric sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pufferfish_jax.data.cifar import MEAN, STD


def image_classification(label_smoothing: float = 0.0, mean=MEAN, std=STD, dtype=jnp.float32):
    """Cross-entropy on uint8 NHWC images normalized on device; metrics: ``loss_sum``, ``correct``, ``count``.

    ``mean``/``std``: per-channel normalization on the 0–255 scale (CIFAR's by default), done in
    float32; the normalized images enter the model in ``dtype`` (``jnp.bfloat16`` for mixed
    precision). Logits and the loss are float32. A ``mask`` in the batch (padded evaluation
    batches) zeroes the padding.
    """
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], carry=()):
        x = ((batch["image"].astype(jnp.float32) - mean) / std).astype(dtype)
        logits = model(x).astype(jnp.float32)
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing) if label_smoothing else jax.nn.one_hot(labels, logits.shape[-1])
        per_example = optax.softmax_cross_entropy(logits, targets)
        mask = batch.get("mask", jnp.ones_like(per_example))
        count = mask.sum()
        loss = (per_example * mask).sum() / jnp.maximum(count, 1.0)
        correct = ((jnp.argmax(logits, -1) == labels) * mask).sum()
        return loss, {"loss_sum": (per_example * mask).sum(), "correct": correct, "count": count}, carry

    return loss_fn


def language_model():
    """Next-token cross-entropy over one BPTT chunk, the hidden state carried across chunks.

    ``batch``: ``input`` and ``target`` int ``(b, T)`` (target = input shifted by one token) and
    optionally ``mask`` float ``(b, T)`` (0 on the padding of the last, shorter chunk). The
    incoming ``carry`` (per layer ``(c, h)``) has its gradient stopped — truncated
    backpropagation, the official ``repackage_hidden`` — and the chunk's final state is returned
    for the next chunk. Metrics: ``loss_sum`` over tokens and ``count`` of tokens (perplexity is
    ``exp(loss_sum / count)``).
    """

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], carry):
        carry = jax.lax.stop_gradient(carry)
        logits, carry = model(batch["input"], carry)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["target"])
        mask = batch.get("mask", jnp.ones_like(per_token))
        loss_sum = (per_token * mask).sum()
        count = mask.sum()
        return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count}, carry

    return loss_fn
