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


def translation(label_smoothing: float = 0.1, pad_id: int = 0):
    """Label-smoothed cross-entropy over the non-PAD target tokens of a translation batch
    (``src``, ``tgt_in``, ``tgt_out`` int ids), as the official Transformer code: the true token
    gets ``1 - ε`` and every other token ``ε / (V - 1)``.

    The differentiated loss is the smoothed cross-entropy averaged over the batch's target tokens;
    the metric sums are the *unsmoothed* negative log-likelihood (``loss_sum``, so the reported
    loss is a true per-token NLL and ``exp`` of it a perplexity), next-token ``correct`` and the
    token ``count``. No carry: receives and returns ``()``.
    """

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], carry=()):
        logits = model(batch["src"], batch["tgt_in"]).astype(jnp.float32)
        labels = batch["tgt_out"]
        mask = (labels != pad_id).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        if label_smoothing:
            vocab = logits.shape[-1]
            off = label_smoothing / (vocab - 1)
            # Σ_v q_v·(-log p_v) with q = off everywhere except 1 - ε on the label.
            smoothed = (1.0 - label_smoothing - off) * nll - off * logp.sum(-1)
        else:
            smoothed = nll
        count = mask.sum()
        loss = (smoothed * mask).sum() / jnp.maximum(count, 1.0)
        correct = ((jnp.argmax(logits, -1) == labels) * mask).sum()
        return loss, {"loss_sum": (nll * mask).sum(), "correct": correct, "count": count}, carry

    return loss_fn
