"""pufferfish_jax: Pufferfish (Wang, Agarwal, Papailiopoulos, MLSys 2021) in JAX/Flax NNX.

Pre-factorized low-rank layers make the gradients all-reduced in data-parallel
training small; a hybrid network (first layers full rank) and a vanilla warm-up
followed by one truncated-SVD switch keep the accuracy.

Public API:
  - layers: :class:`LowRankLinear`, :class:`LowRankConv`, :class:`LowRankLinearGeneral`, :class:`LowRankLSTMCell`
  - the switch: :func:`factorize` (in-place surgery, one compiled SVD call), :func:`plan`, :func:`low_rank_init`
  - the rank rule: :func:`low_rank`
  - accounting: :func:`count_params`, :func:`count_macs`, :func:`grad_bytes`
  - :func:`pufferfish_jax.convolution.conv_general_dilated`: ``lax``'s, without XLA:CPU's slow
    path for maps smaller than the kernel (pass it to ``nnx.Conv``)
"""

from pufferfish_jax import runtime as _runtime  # noqa: F401  (XLA:CPU flags must be set before jax initializes)
from pufferfish_jax.accounting import count_macs, count_params, grad_bytes
from pufferfish_jax.factorize import FactorizedLayer, factorize, low_rank_init, plan, truncated_svd_factors
from pufferfish_jax.layers import LowRankConv, LowRankLinear, LowRankLinearGeneral, LowRankLSTMCell
from pufferfish_jax.ranks import low_rank, validate_rank_ratio

__all__ = [
    "FactorizedLayer",
    "LowRankConv",
    "LowRankLSTMCell",
    "LowRankLinear",
    "LowRankLinearGeneral",
    "count_macs",
    "count_params",
    "factorize",
    "grad_bytes",
    "low_rank",
    "low_rank_init",
    "plan",
    "truncated_svd_factors",
    "validate_rank_ratio",
]
