"""Model surgery: turn any NNX model into its Pufferfish form (§3.1 and the warm-up switch, §3.2).

Every ``nnx.Linear``, ``nnx.Conv`` and ``nnx.LinearGeneral`` (which covers the
8 gates of ``nnx.LSTMCell``) that is not kept full rank is replaced in place by
its low-rank module. With ``init="svd"`` the factors come from the truncated SVD
of the layer's current weight ``W = UΣVᵀ`` (``W`` viewed as ``fan_in × fan_out``):
first factor ``U_rΣ_r^½``, second ``Σ_r^½V_rᵀ``, bias moved to the second. All
SVDs run in one compiled call: same-shaped matrices are stacked and decomposed
as a batch, so a ResNet-18 switch is one dispatch, not 14 eager SVDs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pufferfish_jax import ranks as rank_rule
from pufferfish_jax import runtime
from pufferfish_jax.layers import LOW_RANK_TYPES, LowRankConv, LowRankLinear, LowRankLinearGeneral


@dataclasses.dataclass(frozen=True)
class FactorizedLayer:
    """One layer that ``factorize`` replaced: where it was, its matrix shape and its rank."""

    path: str
    kind: str
    fan_in: int
    fan_out: int
    rank: int

    @property
    def params_saved(self) -> int:
        """Kernel entries removed by the split (biases are unchanged)."""
        return self.fan_in * self.fan_out - self.rank * (self.fan_in + self.fan_out)


def _fans(module: nnx.Module) -> tuple[str, int, int] | None:
    """(kind, fan_in, fan_out) of a layer that can be factorized, else None."""
    if isinstance(module, nnx.Conv):
        if module.feature_group_count != 1 or module.mask is not None:
            return None  # grouped/masked convs have no single fan_in × fan_out matrix
        k = module.kernel_shape
        return "conv", math.prod(k[:-1]), k[-1]
    if isinstance(module, nnx.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            return None
        return "linear_general", math.prod(module.in_features), math.prod(module.out_features)
    return None


def dotted(path: Sequence[Any]) -> str:
    """``('layer1', 0, 'conv1')`` → ``'layer1.0.conv1'``."""
    return ".".join(str(p) for p in path)


def plan(
    model: nnx.Module,
    rank_ratio: float,
    keep_full_rank: Sequence[str] = (),
    overrides: Mapping[str, float] | None = None,
) -> list[FactorizedLayer]:
    """The layers ``factorize`` would replace, in module order, without touching the model.

    Args:
      model: any NNX module.
      rank_ratio: default ratio in (0, 1]; ``r = int(min(fan_in, fan_out)·rank_ratio)``.
      keep_full_rank: globs of dotted module paths (``"layer1.0"``, ``"*shortcut*"``) to leave alone.
      overrides: glob → ratio for particular layers (a ratio of 1.0 keeps the layer).
    """
    rank_ratio = rank_rule.validate_rank_ratio(rank_ratio)
    chosen: list[FactorizedLayer] = []
    # ``nnx.iter_modules`` visits children before their parent, so the low-rank layers are
    # collected first: their factors (``first``/``second``) are never split again.
    modules = list(nnx.iter_modules(model))
    low_rank_paths = [tuple(path) for path, module in modules if isinstance(module, LOW_RANK_TYPES)]
    for path, module in modules:
        path = tuple(path)
        if any(path[: len(p)] == p for p in low_rank_paths):
            continue  # an already low-rank layer, or one of its factors
        name = dotted(path)
        fans = _fans(module)
        if fans is None or rank_rule.path_matches(name, keep_full_rank):
            continue
        kind, fan_in, fan_out = fans
        rank = rank_rule.low_rank(fan_in, fan_out, rank_rule.ratio_for(name, rank_ratio, overrides))
        if rank is not None:
            chosen.append(FactorizedLayer(name, kind, fan_in, fan_out, rank))
    return chosen


def _batched(decompose: Callable[[jax.Array], Any], stack: jax.Array) -> Any:
    """``decompose`` over the leading axis of ``stack``.

    On GPU/TPU this is one batched decomposition. On CPU, jaxlib 0.10 splits a batched LAPACK
    call across the same thread pool that runs the compiled program and blocks a worker until
    its pieces finish; two such calls at once (two groups) deadlock a 2-core machine. So on
    CPU each matrix gets its own (unbatched) LAPACK call, still inside the one compiled call.
    """
    if jax.default_backend() != "cpu" or stack.shape[0] == 1:
        return decompose(stack)
    parts = [decompose(m) for m in stack]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def _split_one_group(stack: jax.Array, r: int, method: str) -> tuple[jax.Array, jax.Array]:
    """Rank-``r`` factors of a stack ``(n, fan_in, fan_out)`` of matrices."""
    if method == "svd":
        u, s, vt = _batched(functools.partial(jnp.linalg.svd, full_matrices=False), stack)
        root = jnp.sqrt(s[:, :r])
        return u[:, :, :r] * root[:, None, :], root[:, :, None] * vt[:, :r, :]
    # "eigh": the SVD through the eigendecomposition of the Gram matrix of the smaller side.
    # It is several times faster than LAPACK's gesdd on CPU (mostly matmuls, which also suit
    # GPU/TPU), and the product it yields, W·V_r·V_rᵀ, is an orthogonal projection of W, so the
    # reconstruction is the best rank-r one up to fp32 rounding of the kept spectrum.
    tall = stack.shape[1] >= stack.shape[2]
    mats = stack if tall else jnp.swapaxes(stack, 1, 2)
    gram = jnp.einsum("nij,nik->njk", mats, mats, precision=jax.lax.Precision.HIGHEST)
    _, eigvecs = _batched(jnp.linalg.eigh, gram)  # ascending
    v = eigvecs[:, :, ::-1][:, :, :r]  # top-r right singular vectors
    u_sigma = jnp.einsum("nij,njr->nir", mats, v, precision=jax.lax.Precision.HIGHEST)  # U_rΣ_r
    # σ_i = ‖W v_i‖ is more accurate than √λ_i, and not using eigh's eigenvalues also avoids an
    # XLA:CPU deadlock (jaxlib 0.10) seen when they are consumed beside a large dot.
    sigma = jnp.linalg.norm(u_sigma, axis=1)
    root = jnp.sqrt(sigma)
    # Directions with zero singular value carry no weight: drop them rather than divide by 0.
    safe = jnp.where(root > 0, root, 1.0)
    left = jnp.where(root[:, None, :] > 0, u_sigma / safe[:, None, :], 0.0)
    right = root[:, :, None] * jnp.swapaxes(v, 1, 2)
    if tall:
        return left, right  # W ≈ (U_rΣ_r^½)(Σ_r^½V_rᵀ)
    return jnp.swapaxes(right, 1, 2), jnp.swapaxes(left, 1, 2)


def truncated_svd_factors(
    groups: tuple[tuple[jax.Array, ...], ...], ranks: tuple[int, ...], method: str = "eigh"
) -> list[tuple[jax.Array, jax.Array]]:
    """For each group of same-shaped ``fan_in × fan_out`` matrices and its rank ``r``,
    returns stacked factors ``(U_rΣ_r^½, Σ_r^½V_rᵀ)`` of shapes ``(n, fan_in, r)`` and ``(n, r, fan_out)``.

    One compiled call for the whole model; each group is one batched decomposition.
    ``method="svd"`` uses LAPACK's SVD; ``"eigh"`` (default) the Gram-matrix eigendecomposition.
    """
    out: list[tuple[jax.Array, jax.Array]] = []
    for mats, r in zip(groups, ranks):
        stack = jnp.stack([m.astype(jnp.float32) for m in mats])
        out.append(_split_one_group(stack, r, method))
    return out


@functools.partial(jax.jit, static_argnames=("fans", "ranks", "shapes", "method"))
def _factor_kernels(
    kernels: tuple[jax.Array, ...],
    fans: tuple[tuple[int, int], ...],
    ranks: tuple[int, ...],
    shapes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...],
    method: str,
) -> list[tuple[jax.Array, jax.Array]]:
    """The whole switch as one compiled call: kernels in, both factor kernels of every layer out,
    already in their module shapes and dtypes (so no per-layer eager op follows)."""
    grouped: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, ((fan_in, fan_out), r) in enumerate(zip(fans, ranks)):
        grouped[(fan_in, fan_out, r)].append(i)
    groups = tuple(tuple(kernels[i].reshape(fans[i]) for i in idx) for idx in grouped.values())
    factors = truncated_svd_factors(groups, tuple(k[2] for k in grouped), method)
    out: list[Any] = [None] * len(kernels)
    for idx, (first, second) in zip(grouped.values(), factors):
        for j, i in enumerate(idx):
            dtype = kernels[i].dtype
            out[i] = (first[j].reshape(shapes[i][0]).astype(dtype), second[j].reshape(shapes[i][1]).astype(dtype))
    return out


def _low_rank_module(old: nnx.Module, rank: int, rngs: nnx.Rngs) -> nnx.Module:
    """A freshly initialized low-rank twin of ``old`` with the same dtypes and geometry."""
    common = dict(dtype=old.dtype, param_dtype=old.param_dtype, precision=old.precision, use_bias=old.use_bias, rngs=rngs)
    if isinstance(old, nnx.Conv):
        return LowRankConv(
            old.in_features, old.out_features, old.kernel_size, rank, strides=old.strides, padding=old.padding,
            input_dilation=old.input_dilation, kernel_dilation=old.kernel_dilation,
            conv_general_dilated=old.conv_general_dilated, **common,
        )
    if isinstance(old, nnx.Linear):
        return LowRankLinear(old.in_features, old.out_features, rank, **common)
    return LowRankLinearGeneral(old.in_features, old.out_features, rank, axis=old.axis, **common)


_TWINS: dict[str, tuple[nnx.GraphDef, nnx.State]] = {}


def _abstract_twin(old: nnx.Module, rank: int) -> nnx.Module:
    """A low-rank twin of ``old`` with abstract (shape-only) factors, to be overwritten.

    Building a module, even under ``eval_shape``, costs ~10 ms of Python (it traces its
    initializers); a ResNet-18 switch needs 14. Like a compiled program, the structure is built
    once per layer configuration and then only copied (~0.1 ms).
    """
    key = repr((type(old).__name__, rank, old.in_features, old.out_features, old.dtype, old.param_dtype, old.precision,
                old.use_bias, *(getattr(old, a, None) for a in ("kernel_size", "strides", "padding", "input_dilation",
                                                                   "kernel_dilation", "axis", "conv_general_dilated"))))
    if key not in _TWINS:
        _TWINS[key] = nnx.split(nnx.eval_shape(lambda: _low_rank_module(old, rank, nnx.Rngs(0))))
    graphdef, abstract = _TWINS[key]
    return nnx.merge(graphdef, abstract, copy=True)  # a fresh module: no variable shared with another layer


def _locate(model: nnx.Module, path: str) -> tuple[Any, str | int]:
    parent: Any = model
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    return parent, keys[-1]


def _set_child(parent: Any, key: str | int, child: nnx.Module) -> None:
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def _get_child(parent: Any, key: str | int) -> Any:
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def factorize(
    model: nnx.Module,
    rank_ratio: float,
    keep_full_rank: Sequence[str] = (),
    overrides: Mapping[str, float] | None = None,
    *,
    init: Literal["svd", "random"] = "svd",
    rngs: nnx.Rngs | None = None,
    method: Literal["eigh", "svd"] = "eigh",
) -> list[FactorizedLayer]:
    """Replaces, in place, every factorizable layer of ``model`` not kept full rank by its low-rank module.

    Args:
      model: any NNX module (ResNet, VGG, LSTM, Transformer, or your own).
      rank_ratio: in (0, 1]; see :func:`pufferfish_jax.ranks.low_rank`. 1.0 leaves the model vanilla.
      keep_full_rank: globs of dotted module paths kept full rank (the hybrid network, §3.2).
      overrides: glob → rank ratio for particular layers.
      init: ``"svd"`` initializes the factors from the truncated SVD of the current weights
        (the warm-up → low-rank switch); ``"random"`` gives them a fresh initialization
        (training low-rank from scratch, ``--warmup-epochs 0``).
      rngs: randomness for ``init="random"``; defaults to ``nnx.Rngs(0)``.
      method: how the truncated SVD is computed, see :func:`truncated_svd_factors`.

    Returns:
      The replaced layers, in module order.

    On CPU the SVD call has finished when this returns, and while it runs this process's BLAS
    (OpenBLAS, behind jaxlib's LAPACK and numpy) uses one thread: see
    :func:`pufferfish_jax.runtime.single_threaded_blas`.
    """
    layers = plan(model, rank_ratio, keep_full_rank, overrides)
    if not layers:
        return layers
    if any(layer.path == "" for layer in layers):
        raise ValueError(f"factorize replaces layers inside a model in place, so it cannot replace the model itself "
                         f"(a bare {type(model).__name__}); build the low-rank layer directly "
                         "(e.g. LowRankLinear) or wrap it in a module")
    sites = [_locate(model, layer.path) for layer in layers]
    olds = [_get_child(parent, key) for parent, key in sites]

    if init == "random":
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        for (parent, key), old, layer in zip(sites, olds, layers):
            _set_child(parent, key, _low_rank_module(old, layer.rank, rngs))
        return layers
    if init != "svd":
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")

    news = [_abstract_twin(old, layer.rank) for old, layer in zip(olds, layers)]
    platform = jax.default_backend()
    # On CPU, LAPACK (OpenBLAS) running multi-threaded beside XLA's own threads oversubscribes
    # the cores (runtime.single_threaded_blas); the limit holds only until the call has finished.
    with runtime.single_threaded_blas(platform):
        factors = _factor_kernels(
            tuple(old.kernel[...] for old in olds),
            fans=tuple((layer.fan_in, layer.fan_out) for layer in layers),
            ranks=tuple(layer.rank for layer in layers),
            shapes=tuple((new.first.kernel.shape, new.second.kernel.shape) for new in news),
            method=method,
        )
        if platform == "cpu":
            jax.block_until_ready(factors)
    for (parent, key), old, new, (first, second) in zip(sites, olds, news, factors):
        new.first.kernel.set_value(first)
        new.second.kernel.set_value(second)
        if old.use_bias:
            new.second.bias.set_value(old.bias.get_value())
        _set_child(parent, key, new)
    return layers


def low_rank_init(
    model_fn: Callable[[], nnx.Module],
    rank_ratio: float,
    keep_full_rank: Sequence[str] = (),
    overrides: Mapping[str, float] | None = None,
    *,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """Builds ``model_fn()`` and factorizes it with fresh random factors (no warm-up)."""
    model = model_fn()
    factorize(model, rank_ratio, keep_full_rank, overrides, init="random", rngs=rngs)
    return model
