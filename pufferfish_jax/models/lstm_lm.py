"""2-layer LSTM language model with a tied embedding/decoder (the official Pufferfish LM, §4).

The layout of the official ``word_language_model``: embedding → dropout → LSTM layer 1 →
dropout → LSTM layer 2 → dropout → decoder whose weight is the embedding (Press & Wolf 2016).
Each layer is an ``nnx.LSTMCell``: 8 gate matrices (4 input-to-hidden ``ii, if_, ig, io``,
4 hidden-to-hidden ``hi, hf, hg, ho``), one bias per gate (on the hidden-to-hidden side),
exactly the per-gate LSTM of the official code. That layout is what gives the paper's counts:
with V = 33,278 and emsize = nhid = 1500 the model has 33,278·1500 (tied embedding) + 33,278
(decoder bias) + 2·(8·1500² + 4·1500) = **85,962,278** trainable parameters; PyTorch's
``nn.LSTM`` (b_ih and b_hh, 8 biases per layer) would have 12,000 more.

The gates are plain ``nnx.Linear`` modules, so :func:`pufferfish_jax.factorize` finds all 16
and splits each at ``int(0.25·1500) = 375`` (16 · 1,125,000 fewer entries: **67,962,278**).
The embedding is an ``nnx.Embed`` and the decoder reuses it, so both stay full rank.

Speed: the input-to-hidden products of all time steps are one matmul before the time loop,
and the four gates of each side are stacked so a step does one (vanilla) or two (low-rank)
matmuls instead of four or eight; the loop is one ``jax.lax.scan``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pufferfish_jax.layers import LowRankLinear

Array = jax.Array
Carry = tuple[tuple[Array, Array], ...]
"""Per layer ``(c, h)``, each ``(batch, nhid)``."""

KEEP_FULL_RANK: tuple[str, ...] = ()
"""Nothing: the only ``nnx.Linear`` modules are the 16 gates; embedding and tied decoder are not ``Linear``."""

INPUT_GATES = ("ii", "if_", "ig", "io")
HIDDEN_GATES = ("hi", "hf", "hg", "ho")


def _uniform(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)

    return init


def _compute_dtype(module: nnx.Module, x: Array, *arrays: Array) -> Any:
    return module.dtype if module.dtype is not None else jnp.result_type(x, *arrays)


def stacked_gates(modules: Sequence[nnx.Module]) -> Callable[[Array], Array]:
    """``x (..., fan_in) ↦ (..., len(modules), out)``: every module applied to ``x``, stacked.

    Same result as ``jnp.stack([m(x) for m in modules], -2)``, but when the modules are all
    ``nnx.Linear`` (vanilla) or all :class:`LowRankLinear` (Pufferfish) of one shape, their
    kernels are stacked first so it costs one matmul (two for low-rank: ``x·A`` for all gates
    at once, then a per-gate ``·B``). Anything else falls back to calling each module.
    The kernels are read here, once, so the returned function can run inside ``lax.scan``.
    """
    first = modules[0]
    same = all(type(m) is type(first) for m in modules)
    if same and type(first) is nnx.Linear and len({(m.use_bias, m.kernel.shape) for m in modules}) == 1:
        kernel = jnp.stack([m.kernel[...] for m in modules], 1)  # (in, G, out)
        bias = jnp.stack([m.bias[...] for m in modules]) if first.use_bias else None  # (G, out)

        def linear(x: Array) -> Array:
            dtype = _compute_dtype(first, x, kernel)
            y = jnp.einsum("...i,igo->...go", x.astype(dtype), kernel.astype(dtype), precision=first.precision)
            return y if bias is None else y + bias.astype(dtype)

        return linear
    if same and isinstance(first, LowRankLinear) and len(
        {(m.second.use_bias, m.first.kernel.shape, m.second.kernel.shape) for m in modules}
    ) == 1:
        a = jnp.stack([m.first.kernel[...] for m in modules], 1)  # (in, G, r)
        b = jnp.stack([m.second.kernel[...] for m in modules])  # (G, r, out)
        bias = jnp.stack([m.second.bias[...] for m in modules]) if first.second.use_bias else None

        def low_rank(x: Array) -> Array:
            dtype = _compute_dtype(first.first, x, a)
            p = first.first.precision
            z = jnp.einsum("...i,igr->...gr", x.astype(dtype), a.astype(dtype), precision=p)
            y = jnp.einsum("...gr,gro->...go", z, b.astype(dtype), precision=p)
            return y if bias is None else y + bias.astype(dtype)

        return low_rank
    return lambda x: jnp.stack([m(x) for m in modules], -2)


def run_lstm_layer(cell: nnx.LSTMCell, inputs: Array, carry: tuple[Array, Array]) -> tuple[Array, tuple[Array, Array]]:
    """Runs ``cell`` over a time-major sequence ``inputs (T, B, in)`` from ``carry = (c, h)``.

    Returns ``(outputs (T, B, hidden), (c_T, h_T))``; step by step this is exactly
    ``cell(carry, inputs[t])`` (``nnx.LSTMCell``'s equations), whichever of its gates are
    full rank or low-rank.
    """
    from_input = stacked_gates([getattr(cell, g) for g in INPUT_GATES])
    from_hidden = stacked_gates([getattr(cell, g) for g in HIDDEN_GATES])
    gate_fn, activation_fn = cell.gate_fn, cell.activation_fn
    x_gates = from_input(inputs)  # (T, B, 4, hidden): all time steps in one product

    def step(carry, x_t):
        c, h = carry
        z = x_t + from_hidden(h)
        i, f, o = gate_fn(z[..., 0, :]), gate_fn(z[..., 1, :]), gate_fn(z[..., 3, :])
        g = activation_fn(z[..., 2, :])
        new_c = (f * c + i * g).astype(c.dtype)
        new_h = (o * activation_fn(new_c)).astype(h.dtype)
        return (new_c, new_h), new_h

    (c, h), outputs = jax.lax.scan(step, carry, x_gates)
    return outputs, (c, h)


class LSTMLanguageModel(nnx.Module):
    """Word-level LSTM LM with tied input embedding and output layer.

    ``model(tokens (B, T) int, carry) -> (logits (B, T, vocab) float32, carry)``; ``carry`` is
    :func:`zero_carry`'s per-layer ``(c, h)`` and the returned one continues the sequence in the
    next chunk (truncated BPTT carries it across chunks; the loss stops its gradient).
    Initialization as the official code: embedding (and so the decoder weight) U(-0.1, 0.1),
    gate matrices Xavier-uniform, gate biases and decoder bias zero.
    """

    def __init__(
        self,
        vocab_size: int,
        emsize: int = 1500,
        nhid: int = 1500,
        num_layers: int = 2,
        dropout: float = 0.65,
        *,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        if emsize != nhid:
            raise ValueError(f"a tied decoder needs emsize == nhid, got {emsize} and {nhid}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.vocab_size, self.emsize, self.nhid, self.num_layers = vocab_size, emsize, nhid, num_layers
        self.dtype = dtype
        self.embed = nnx.Embed(vocab_size, emsize, embedding_init=_uniform(-0.1, 0.1), dtype=dtype, rngs=rngs)
        xavier = nnx.initializers.xavier_uniform()
        self.layers = nnx.List([
            nnx.LSTMCell(emsize if i == 0 else nhid, nhid, kernel_init=xavier, recurrent_kernel_init=xavier,
                         dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.decoder_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, tokens: Array, carry: Carry) -> tuple[Array, Carry]:
        x = self.dropout(self.embed(tokens.T))  # time-major (T, B, emsize)
        new_carry = []
        for cell, layer_carry in zip(self.layers, carry):
            x, layer_carry = run_lstm_layer(cell, x, tuple(layer_carry))
            x = self.dropout(x)  # between layers and before the decoder, as the official model
            new_carry.append(layer_carry)
        x = jnp.swapaxes(x, 0, 1)  # back to (B, T, nhid) before the decoder: the logits are the big array
        logits = self.embed.attend(x) + self.decoder_bias[...].astype(x.dtype)
        return logits.astype(jnp.float32), tuple(new_carry)

    def zero_carry(self, batch_size: int) -> Carry:
        """All-zero ``(c, h)`` per layer, ``(batch_size, nhid)`` float32."""
        return zero_carry(batch_size, self.nhid, self.num_layers)


def zero_carry(batch_size: int, nhid: int, num_layers: int = 2) -> Carry:
    """All-zero hidden state: per layer ``(c, h)``, each ``(batch_size, nhid)`` float32."""
    zeros = jnp.zeros((batch_size, nhid), jnp.float32)
    return tuple((zeros, zeros) for _ in range(num_layers))


def lstm_lm(vocab_size: int = 33278, emsize: int = 1500, nhid: int = 1500, dropout: float = 0.65, *,
            num_layers: int = 2, dtype: Any = None, rngs: nnx.Rngs) -> LSTMLanguageModel:
    """The paper's configuration by default (WikiText-2 vocabulary, 1500 units, dropout 0.65):
    85,962,278 trainable parameters vanilla, 67,962,278 after ``factorize(model, 0.25)``."""
    return LSTMLanguageModel(vocab_size, emsize, nhid, num_layers, dropout, dtype=dtype, rngs=rngs)
