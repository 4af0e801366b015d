"""Encoder–decoder Transformer for translation (Vaswani et al. 2017), in the layout of the
``jadore801120/attention-is-all-you-need-pytorch`` code that Pufferfish's Transformer
experiment modifies (``low_rank_transformer/`` in the official repository).

Layout, checked against the paper's parameter counts (vanilla ``44,103,680 + 512·V``,
Pufferfish ``21,821,440 + 512·V`` at d 512, d_ff 2048, 6+6 layers, shared vocabulary V):

- one shared embedding ``V × d`` (source, target and, transposed, the output projection);
  logits are scaled by ``d^-0.5`` as in the official code when the projection is tied;
- sinusoidal positions (no parameters), dropout, then a LayerNorm on the embedded input of
  the encoder and of the decoder (``Encoder.layer_norm``/``Decoder.layer_norm``: 2·2·d);
- post-norm sublayers: ``LN(x + Dropout(sublayer(x)))``, each with its own LayerNorm;
- attention: Q, K, V and the output projection are whole ``d × d`` matrices without biases
  (heads are a reshape, so Pufferfish factorizes each matrix across all heads);
- FFN: ``w2(relu(w1(x)))`` with biases; dropout 0.1 after the FFN, after the attention output
  projection and on the attention probabilities.

Per layer: encoder ``4d² + 2·d·d_ff + d_ff + d + 2·2d`` = 3,150,336; decoder ``8d² + ... + 3·2d``
= 4,199,936; plus the 2 input LayerNorms (2,048): 44,103,680 with 6+6 layers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KEEP_FULL_RANK = ("encoder.layers.0", "decoder.layers.0")
"""Hybrid network (official ``LowRankEncoder``/``LowRankDecoder``): encoder layer 0 and decoder
layer 0 stay full rank; in layers 1–5 Q, K, V, the output projection and both FFN matrices are
factorized. The shared embedding/output projection is an ``nnx.Embed`` and the LayerNorms have no
matrix, so ``factorize`` never touches them."""

NEG_INF = -1e9  # the official masked_fill value: finite, so a fully masked row stays finite


def xavier_uniform() -> nnx.Initializer:
    """PyTorch's ``xavier_uniform_``, which the official code applies to every ≥2-D parameter."""
    return nnx.initializers.xavier_uniform()


def torch_bias_init(fan_in: int) -> nnx.Initializer:
    """PyTorch ``nn.Linear``'s default bias init ``U(±1/√fan_in)`` (the official code leaves biases at it)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def sinusoid_table(length: int, d_model: int) -> np.ndarray:
    """``(length, d_model)`` positional encoding: sin on even, cos on odd dimensions."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    dim = np.arange(d_model)[None, :]
    angle = pos / np.power(10000.0, 2 * (dim // 2) / d_model)
    table = np.where(dim % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(np.float32)


def padding_mask(tokens: jax.Array, pad_id: int) -> jax.Array:
    """``(B, 1, 1, L)`` True where a key is a real token."""
    return (tokens != pad_id)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """``(1, 1, L, L)`` True where query position i may attend to key position j ≤ i."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


class MultiHeadAttention(nnx.Module):
    """Scaled dot-product attention over ``heads`` heads. ``query``/``key``/``value``/``out`` are
    plain ``d_model × d_model`` ``nnx.Linear``s without bias (the official layout), so the
    factorization is of the whole matrix, not per head."""

    def __init__(self, d_model: int, heads: int, dropout: float, *, dtype: Any = None, rngs: nnx.Rngs):
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, d_model // heads
        proj = lambda: nnx.Linear(d_model, d_model, use_bias=False, kernel_init=xavier_uniform(),  # noqa: E731
                                  dtype=dtype, rngs=rngs)
        self.query, self.key, self.value, self.out = proj(), proj(), proj(), proj()
        self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)

    def _split(self, t: jax.Array) -> jax.Array:
        return t.reshape(*t.shape[:-1], self.heads, self.head_dim)

    def keys_values(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values ``(B, Lk, H, head_dim)`` of ``memory`` (cached once per sentence when decoding)."""
        return self._split(self.key(memory)), self._split(self.value(memory))

    def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array) -> jax.Array:
        """``x`` ``(B, Lq, d)`` attends to ``memory`` ``(B, Lk, d)``; ``mask`` broadcasts to ``(B, H, Lq, Lk)``."""
        return self.attend(x, *self.keys_values(memory), mask)

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Attention of the queries of ``x`` over given keys and values (see :meth:`keys_values`)."""
        q = self._split(self.query(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q / math.sqrt(self.head_dim), k)
        logits = jnp.where(mask, logits, jnp.asarray(NEG_INF, logits.dtype))
        probs = self.attn_dropout(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype))
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.out(context.reshape(*context.shape[:-2], -1))


class FeedForward(nnx.Module):
    """``w2(relu(w1(x)))``, both with biases (the official ``PositionwiseFeedForward``)."""

    def __init__(self, d_model: int, d_ff: int, *, dtype: Any = None, rngs: nnx.Rngs):
        self.w1 = nnx.Linear(d_model, d_ff, kernel_init=xavier_uniform(), bias_init=torch_bias_init(d_model),
                             dtype=dtype, rngs=rngs)
        self.w2 = nnx.Linear(d_ff, d_model, kernel_init=xavier_uniform(), bias_init=torch_bias_init(d_ff),
                             dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(nnx.relu(self.w1(x)))


def layer_norm(d_model: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d_model, epsilon=1e-6, dtype=dtype, rngs=rngs)


class EncoderLayer(nnx.Module):
    """Self-attention and FFN sublayers, each ``LN(x + Dropout(sublayer(x)))``."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, *, dtype: Any = None, rngs: nnx.Rngs):
        self.self_attn = MultiHeadAttention(d_model, heads, dropout, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(d_model, dtype, rngs)
        self.ffn = FeedForward(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(d_model, dtype, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.norm1(x + self.dropout(self.self_attn(x, x, mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nnx.Module):
    """Masked self-attention, encoder–decoder attention and FFN sublayers (post-norm)."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, *, dtype: Any = None, rngs: nnx.Rngs):
        self.self_attn = MultiHeadAttention(d_model, heads, dropout, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(d_model, dtype, rngs)
        self.cross_attn = MultiHeadAttention(d_model, heads, dropout, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(d_model, dtype, rngs)
        self.ffn = FeedForward(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(d_model, dtype, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, memory: jax.Array, self_mask: jax.Array, memory_mask: jax.Array) -> jax.Array:
        return self.step(x, self.self_attn.keys_values(x), self.cross_attn.keys_values(memory), self_mask, memory_mask)

    def step(self, x: jax.Array, self_kv: tuple[jax.Array, jax.Array], memory_kv: tuple[jax.Array, jax.Array],
             self_mask: jax.Array, memory_mask: jax.Array) -> jax.Array:
        """The layer on queries ``x`` with given self-attention and memory keys/values (the
        incremental decoder passes its cache; the full decoder those of ``x`` and the memory)."""
        x = self.norm1(x + self.dropout(self.self_attn.attend(x, *self_kv, self_mask)))
        x = self.norm2(x + self.dropout(self.cross_attn.attend(x, *memory_kv, memory_mask)))
        return self.norm3(x + self.dropout(self.ffn(x)))


class Stack(nnx.Module):
    """Embedded input → dropout → LayerNorm → ``layers`` (the official Encoder/Decoder bodies)."""

    def __init__(self, layers: list[nnx.Module], d_model: int, dropout: float, dtype: Any, rngs: nnx.Rngs):
        self.input_norm = layer_norm(d_model, dtype, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.layers = nnx.List(layers)

    def embed(self, embedded: jax.Array, position: jax.Array | None = None, max_len: int = 0) -> jax.Array:
        """Adds sinusoidal positions ``0..L-1`` to ``embedded`` ``(B, L, d)``, or, for one decoding
        step (``L = 1``), position ``position`` of a table of ``max_len`` rows."""
        length, d_model = embedded.shape[-2:]
        if position is None:
            positions = jnp.asarray(sinusoid_table(length, d_model), embedded.dtype)
        else:
            table = jnp.asarray(sinusoid_table(max_len, d_model), embedded.dtype)
            positions = jax.lax.dynamic_slice_in_dim(table, position, 1)
        return self.input_norm(self.dropout(embedded + positions))


class Transformer(nnx.Module):
    """Encoder–decoder Transformer with one shared source/target vocabulary.

    ``model(src, tgt_in)`` → logits ``(B, L_tgt, vocab)`` in float32, for ``src`` ``(B, L_src)``
    and ``tgt_in`` ``(B, L_tgt)`` int token ids (``pad_id`` pads). :meth:`encode` and
    :meth:`decode` split the two halves for incremental decoding.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 512,
        heads: int = 8,
        d_ff: int = 2048,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        dropout: float = 0.1,
        pad_id: int = 0,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        self.vocab_size, self.d_model, self.pad_id = vocab_size, d_model, pad_id
        # Shared by encoder input, decoder input and (transposed) the output projection.
        self.embedding = nnx.Embed(vocab_size, d_model, embedding_init=xavier_uniform(), dtype=dtype, rngs=rngs)
        self.encoder = Stack([EncoderLayer(d_model, heads, d_ff, dropout, dtype=dtype, rngs=rngs)
                              for _ in range(encoder_layers)], d_model, dropout, dtype, rngs)
        self.decoder = Stack([DecoderLayer(d_model, heads, d_ff, dropout, dtype=dtype, rngs=rngs)
                              for _ in range(decoder_layers)], d_model, dropout, dtype, rngs)

    def encode(self, src: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(memory (B, L_src, d), source key mask (B, 1, 1, L_src))``."""
        mask = padding_mask(src, self.pad_id)
        x = self.encoder.embed(self.embedding(src))
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x, mask

    def decode(self, tgt_in: jax.Array, memory: jax.Array, memory_mask: jax.Array) -> jax.Array:
        """Logits ``(B, L_tgt, vocab)``; position i sees ``tgt_in[:, :i+1]`` only (causal + padding mask)."""
        self_mask = padding_mask(tgt_in, self.pad_id) & causal_mask(tgt_in.shape[1])
        x = self.decoder.embed(self.embedding(tgt_in))
        for layer in self.decoder.layers:
            x = layer(x, memory, self_mask, memory_mask)
        # Tied output projection, scaled by d^-0.5 as the official code does when it ties.
        return self.embedding.attend(x).astype(jnp.float32) * self.d_model ** -0.5

    def __call__(self, src: jax.Array, tgt_in: jax.Array) -> jax.Array:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    def init_cache(self, memory: jax.Array, max_len: int) -> list[dict[str, jax.Array]]:
        """Per decoder layer: the memory's keys/values (computed once) and empty self-attention
        key/value buffers ``(B, max_len, H, head_dim)`` for :meth:`decode_step`."""
        cache = []
        for layer in self.decoder.layers:
            mk, mv = layer.cross_attn.keys_values(memory)
            empty = jnp.zeros((memory.shape[0], max_len, *mk.shape[2:]), mk.dtype)
            cache.append({"memory_k": mk, "memory_v": mv, "k": empty, "v": empty})
        return cache

    def decode_step(self, token: jax.Array, position: jax.Array, cache: list[dict[str, jax.Array]],
                    memory_mask: jax.Array) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """Logits ``(B, vocab)`` for the token after ``token`` ``(B,)`` at ``position``, and the
        cache with this position's keys/values written: equal to :meth:`decode` at ``position``
        of the sequence fed so far, at ``O(1)`` positions per step instead of ``O(max_len)``."""
        max_len = cache[0]["k"].shape[1]
        x = self.decoder.embed(self.embedding(token[:, None]), position, max_len)
        visible = (jnp.arange(max_len) <= position)[None, None, None, :]
        new_cache = []
        for layer, c in zip(self.decoder.layers, cache):
            k, v = layer.self_attn.keys_values(x)
            k = jax.lax.dynamic_update_slice_in_dim(c["k"], k.astype(c["k"].dtype), position, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(c["v"], v.astype(c["v"].dtype), position, axis=1)
            x = layer.step(x, (k, v), (c["memory_k"], c["memory_v"]), visible, memory_mask)
            new_cache.append({**c, "k": k, "v": v})
        logits = self.embedding.attend(x[:, 0]).astype(jnp.float32) * self.d_model ** -0.5
        return logits, new_cache


def transformer(vocab_size: int, *, d_model: int = 512, heads: int = 8, d_ff: int = 2048, layers: int = 6,
                dropout: float = 0.1, pad_id: int = 0, dtype: Any = None, rngs: nnx.Rngs) -> Transformer:
    """The paper's configuration by default (6+6 layers, d 512, 8 heads, d_ff 2048, dropout 0.1):
    ``44,103,680 + 512·V`` trainable parameters, ``21,821,440 + 512·V`` after
    ``factorize(model, 0.25, KEEP_FULL_RANK)``."""
    return Transformer(vocab_size, d_model=d_model, heads=heads, d_ff=d_ff, encoder_layers=layers,
                       decoder_layers=layers, dropout=dropout, pad_id=pad_id, dtype=dtype, rngs=rngs)

