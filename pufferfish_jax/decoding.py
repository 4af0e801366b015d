"""Greedy and beam-search decoding for the encoder–decoder Transformer, and corpus BLEU.

Both searches are one compiled ``while_loop`` each with static shapes (``max_len`` target
positions): the encoder runs once, each decoder layer keeps a key/value cache of its
self-attention (``Transformer.decode_step``) plus the keys/values of the memory, so a step costs
one position. The loop stops early once every hypothesis has produced EOS; :func:`translate`
sizes ``max_len`` per batch from the source length.

Beam search keeps ``beam_size`` hypotheses per sentence; a finished hypothesis is frozen (it can
only be extended by PAD at zero cost), and the answer is the hypothesis with the best
``log P / length^length_penalty`` (the official translator's ``alpha = 0.7``; 0 ranks by log-probability).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pufferfish_jax.data.translation import BOS, EOS, PAD, Tokenizer, pad_rows, padded_length


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _greedy(graphdef: nnx.GraphDef, state: nnx.State, src: jax.Array, *, max_len: int):
    model = nnx.merge(graphdef, state)
    memory, mask = model.encode(src)
    b = src.shape[0]
    cache = model.init_cache(memory, max_len)
    out = jnp.full((b, max_len), PAD, jnp.int32)

    def cond(carry):
        t, *_, finished = carry
        return (t < max_len) & ~jnp.all(finished)

    def body(carry):
        t, last, cache, out, logprob, finished = carry
        logits, cache = model.decode_step(last, t, cache, mask)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.where(finished, PAD, jnp.argmax(logp, axis=-1).astype(jnp.int32))
        logprob = logprob + jnp.where(finished, 0.0, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0])
        return t + 1, tok, cache, out.at[:, t].set(tok), logprob, finished | (tok == EOS)

    init = (jnp.int32(0), jnp.full((b,), BOS, jnp.int32), cache, out, jnp.zeros((b,), jnp.float32),
            jnp.zeros((b,), bool))
    *_, out, logprob, _ = jax.lax.while_loop(cond, body, init)
    return out, logprob


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "beam_size", "length_penalty"))
def _beam(graphdef: nnx.GraphDef, state: nnx.State, src: jax.Array, *, max_len: int, beam_size: int,
          length_penalty: float):
    model = nnx.merge(graphdef, state)
    b, k = src.shape[0], beam_size
    memory, mask = model.encode(src)
    memory, mask = jnp.repeat(memory, k, axis=0), jnp.repeat(mask, k, axis=0)  # row i*k + j: sentence i, beam j
    cache = model.init_cache(memory, max_len)
    out = jnp.full((b, k, max_len), PAD, jnp.int32)
    # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
    scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None], (b, 1))

    def cond(carry):
        t, *_, finished, _ = carry
        return (t < max_len) & ~jnp.all(finished)

    def body(carry):
        t, last, cache, out, scores, finished, lengths = carry
        logits, cache = model.decode_step(last.reshape(b * k), t, cache, mask)
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, -1)
        vocab = logp.shape[-1]
        frozen = jnp.where(jnp.arange(vocab) == PAD, 0.0, -jnp.inf)  # a finished beam only "emits" PAD, for free
        logp = jnp.where(finished[..., None], frozen, logp)
        top, idx = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * vocab), k)
        parent, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        pick = lambda x: jnp.take_along_axis(x, parent.reshape(b, k, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731
        # Reorder the self-attention caches to follow each survivor's parent (the memory's are shared).
        by_beam = lambda x: pick(x.reshape(b, k, *x.shape[1:])).reshape(x.shape)  # noqa: E731
        cache = [{**c, "k": by_beam(c["k"]), "v": by_beam(c["v"])} for c in cache]
        out, was_finished, lengths = pick(out), pick(finished), pick(lengths)
        out = out.at[:, :, t].set(tok)
        lengths = lengths + (~was_finished).astype(jnp.int32)
        return t + 1, tok, cache, out, top, was_finished | (tok == EOS), lengths

    init = (jnp.int32(0), jnp.full((b, k), BOS, jnp.int32), cache, out, scores, jnp.zeros((b, k), bool),
            jnp.zeros((b, k), jnp.int32))
    *_, out, scores, _, lengths = jax.lax.while_loop(cond, body, init)
    ranked = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty if length_penalty else scores
    best = jnp.argmax(ranked, axis=1)
    take = lambda x: jnp.take_along_axis(x, best.reshape(b, *([1] * (x.ndim - 1))), axis=1)[:, 0]  # noqa: E731
    return take(out), take(scores)


def greedy_decode(model: nnx.Module, src: jax.Array | np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy translation of ``src`` ``(B, L_src)`` (BOS … EOS, PAD-padded) by an eval-mode model.

    Returns the generated ids ``(B, max_len)`` (no BOS; EOS then PAD once finished) and each
    hypothesis's log-probability ``(B,)`` (up to and including EOS).
    """
    graphdef, state = nnx.split(model)
    out, logprob = _greedy(graphdef, state, jnp.asarray(src, jnp.int32), max_len=max_len)
    return np.asarray(out), np.asarray(logprob)


def beam_search(model: nnx.Module, src: jax.Array | np.ndarray, max_len: int, beam_size: int = 5,
                length_penalty: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Beam search; returns the best hypothesis ``(B, max_len)`` by ``log P / length^length_penalty``
    and its log-probability ``(B,)``. ``beam_size=1`` is greedy search."""
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    graphdef, state = nnx.split(model)
    out, logprob = _beam(graphdef, state, jnp.asarray(src, jnp.int32), max_len=max_len, beam_size=beam_size,
                         length_penalty=float(length_penalty))
    return np.asarray(out), np.asarray(logprob)


def decode_length(src_len: int, limit: int) -> int:
    """Target buffer length for a batch whose longest source has ``src_len`` tokens:
    ``1.5·src_len + 10`` rounded up to 16 (few distinct shapes), at most ``limit``."""
    return min(limit, padded_length(int(1.5 * src_len) + 10, 16))


def translate(model: nnx.Module, tok: Tokenizer, sentences: Sequence[str], *, beam_size: int = 1,
              length_penalty: float = 0.7, batch_size: int = 64, max_len: int = 100, src_max_len: int = 100,
              pad_multiple: int = 16) -> list[str]:
    """Detokenized translations of raw ``sentences`` (in their order), greedy when ``beam_size`` is 1.

    Sources are wrapped in BOS … EOS and cut to ``src_max_len`` tokens, sorted by length and
    decoded ``batch_size`` at a time (the last batch padded with empty sources), each batch padded
    to a multiple of ``pad_multiple`` tokens.
    """
    model.eval()
    src = [np.asarray([BOS, *ids[: src_max_len - 2], EOS], np.int32) for ids in tok.encode(sentences)]
    order = np.argsort([len(s) for s in src], kind="stable")
    result: list[str] = [""] * len(src)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [src[i] for i in idx] + [np.asarray([BOS, EOS], np.int32)] * (batch_size - len(idx))
        length = max(len(r) for r in rows)
        batch = pad_rows(rows, padded_length(length, pad_multiple))
        target_len = decode_length(length, max_len)
        if beam_size == 1:
            out, _ = greedy_decode(model, batch, target_len)
        else:
            out, _ = beam_search(model, batch, target_len, beam_size, length_penalty)
        for row, i in zip(out, idx):
            result[i] = tok.decode(row)
    return result


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of detokenized text with sacrebleu's defaults (13a tokenization, exp smoothing)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
