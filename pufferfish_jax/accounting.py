"""What a model costs: trainable parameters, multiply–accumulates, and the all-reduce payload."""

from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (``nnx.Param``); BN running statistics are excluded."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def grad_bytes(model: nnx.Module, bytes_per_entry: int = 4) -> int:
    """Bytes of one exact gradient all-reduce payload (fp32 by default): one entry per parameter."""
    return count_params(model) * bytes_per_entry


def _eqn_macs(eqn: jax.extend.core.JaxprEqn) -> int:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        out = eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        # Per output element: the kernel's spatial size × input features per group.
        rhs_spec = dn.rhs_spec
        spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
        return math.prod(out.shape) * spatial * rhs.shape[rhs_spec[1]]
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)
    # Recurse into jit/scan/cond/custom-vjp bodies so nested layers are counted too.
    if name == "cond":
        # One branch runs: count the costliest (summing them would count layers never executed).
        return max((_jaxpr_macs(branch.jaxpr) for branch in eqn.params["branches"]), default=0)
    total = 0
    for param in eqn.params.values():
        for inner in param if isinstance(param, (tuple, list)) else (param,):
            if isinstance(inner, jax.extend.core.ClosedJaxpr):
                total += _jaxpr_macs(inner.jaxpr)
            elif isinstance(inner, jax.extend.core.Jaxpr):
                total += _jaxpr_macs(inner)
    if name == "scan":
        # The body runs once per step (an ``nnx.RNN``/``nnx.scan`` over T steps costs T cells).
        total *= eqn.params["length"]
    return total


def _jaxpr_macs(jaxpr) -> int:
    return sum(_eqn_macs(eqn) for eqn in jaxpr.eqns)


def count_macs(model: nnx.Module, input_shape: tuple[int, ...], dtype=jnp.float32) -> int:
    """Multiply–accumulates of one forward pass in eval mode, summed over every convolution and
    matrix product (what the official ``ptflops`` counter reports for conv/linear layers).
    A ``scan`` body (e.g. an RNN over time) counts once per step, a ``cond`` its costliest
    branch; a ``while_loop`` body, whose trip count is unknown when tracing, counts once.

    ``input_shape`` includes the batch dimension; divide by it for a per-example figure.
    Traced abstractly, so it costs no FLOPs.
    """
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    closed = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct(input_shape, dtype))
    return _jaxpr_macs(closed.jaxpr)
