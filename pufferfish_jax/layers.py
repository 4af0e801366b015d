"""Pre-factorized low-rank layers (Pufferfish §3).

Each layer is the product of two thinner layers with nothing between them, so
its gradient — the payload all-reduced in data-parallel training — has
``r·(fan_in + fan_out)`` entries instead of ``fan_in·fan_out``. The factors are
ordinary ``nnx.Linear``/``nnx.Conv``/``nnx.LinearGeneral`` modules named
``first`` and ``second``: the first has no bias, the second carries the bias of
the layer it replaces.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pufferfish_jax.convolution import conv_general_dilated as _conv_general_dilated

Array = jax.Array

GATES = ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")
"""Names of the 8 gate matrices of ``nnx.LSTMCell`` (4 input-to-hidden, 4 hidden-to-hidden)."""


class LowRankLinear(nnx.Module):
    """``x ↦ (x·A)·B + bias`` with A: ``in × rank`` (no bias) and B: ``rank × out``.

    Replaces ``nnx.Linear(in_features, out_features)``; ``first.kernel`` is A and
    ``second.kernel``/``second.bias`` are B and the bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.first = nnx.Linear(in_features, rank, use_bias=False, **common)
        self.second = nnx.Linear(rank, out_features, use_bias=use_bias, **common)

    def __call__(self, x: Array) -> Array:
        return self.second(self.first(x))


class LowRankConv(nnx.Module):
    """A ``k×k`` conv ``c_in → rank`` (original stride, padding, dilation; no bias), then a
    ``1×1`` conv ``rank → c_out`` that carries the bias.

    Replaces ``nnx.Conv(c_in, c_out, kernel_size)``. Nothing sits between the two
    factors, so their composition is exactly a rank-``rank`` conv (as the official code).
    ``conv_general_dilated`` is what both factors convolve with (``nnx.Conv``'s argument); the
    default is :func:`pufferfish_jax.convolution.conv_general_dilated`, ``lax``'s with XLA:CPU's
    slow path for maps smaller than the kernel avoided.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        rank: int,
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        input_dilation: int | Sequence[int] = 1,
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        conv_general_dilated: Callable[..., Array] = _conv_general_dilated,
        rngs: nnx.Rngs,
    ):
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                      conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.first = nnx.Conv(
            in_features, rank, tuple(kernel_size), strides=strides, padding=padding,
            input_dilation=input_dilation, kernel_dilation=kernel_dilation, use_bias=False, **common,
        )
        ones = (1,) * len(kernel_size)
        self.second = nnx.Conv(rank, out_features, ones, padding="VALID", use_bias=use_bias, **common)

    def __call__(self, x: Array) -> Array:
        return self.second(self.first(x))


class LowRankLinearGeneral(nnx.Module):
    """Low-rank ``nnx.LinearGeneral``: the whole ``prod(in_features) × prod(out_features)``
    matrix is factorized (for attention, all heads together, not per head).

    ``first`` maps the contracted ``axis`` to ``rank``; ``second`` maps ``rank`` to
    ``out_features`` and carries the bias.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        rank: int,
        *,
        axis: int | Sequence[int] = -1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.first = nnx.LinearGeneral(in_features, rank, axis=axis, use_bias=False, **common)
        self.second = nnx.LinearGeneral(rank, out_features, axis=-1, use_bias=use_bias, **common)

    def __call__(self, x: Array) -> Array:
        return self.second(self.first(x))


class LowRankLSTMCell(nnx.LSTMCell):
    """``nnx.LSTMCell`` whose 8 gate matrices are each a :class:`LowRankLinear`.

    The input-to-hidden gates are ``in × rank × hidden`` without bias, the
    hidden-to-hidden gates ``hidden × rank × hidden`` with one bias per gate, so
    a layer keeps exactly one bias per gate as the official per-gate LSTM.
    ``rank`` defaults to ``int(0.25·hidden)`` (375 at 1500).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        rank: int | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        super().__init__(in_features, hidden_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)
        rank = int(0.25 * hidden_features) if rank is None else rank
        self.rank = rank
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for gate in GATES:
            from_input = gate.startswith("i")
            fan_in = in_features if from_input else hidden_features
            setattr(self, gate, LowRankLinear(fan_in, hidden_features, rank, use_bias=not from_input, **common))


LOW_RANK_TYPES = (LowRankLinear, LowRankConv, LowRankLinearGeneral)
