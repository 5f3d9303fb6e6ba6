"""Atomic experts in the dense regime as tensor-core GEMMs over all N experts.

Reference: `omnimoe.reference.atomic_experts` (values) and its autodiff (gradients).
This file holds no Pallas kernel: in this regime XLA's GEMMs (cuBLAS) beat our kernels.

Why. With k in the thousands each expert serves many tokens (the paper's headline:
T = 4096, k = 4096, N = 102,400 = 320 x 320, d = 1024: T k / N = 164 tokens per expert, 4 %
of the (token, expert) grid routed). A token-centric pass gathers two table rows per pair
(16.7 M pairs, ~68 GB); the expert-line kernels (`expert_lines`) tile the routed pairs
onto tensor cores but pay row gathers, float32 atomics and an incidence build per call.
The whole grid as two GEMMs does 4 T N d flops (1.7 TFLOP) whatever the routing, at the
tensor cores' full rate, and the routing enters only as an elementwise mask. Measured on
one H200 (bf16, the headline shapes, routing from the exact router;
experiments/RESULTS.md): two bare GEMMs of these shapes 3.08 ms; this computation's
forward 3.99 ms; `expert_lines` forward 19.5 ms (its incidence build alone 1.7 ms). So the Pallas path hands this regime to this file
(`expert_ops.choose_path`); the expert-line kernels stay selectable (`path="lines"`).

Maths (G the (T, N) routing weights: pair weights scattered at (t, e), duplicate pairs
adding up and ids outside [0, N) dropped, as in the reference):
  forward    S = x U^T;  A = G act(S);  y = A V
  backward   dA = dy V^T;  dS = dA G act'(S);  dx = dS U;  dU = dS^T x;  dV = A^T dy;
             dweights[t, j] = (dA act(S))[t, e_tj]
S is recomputed in the backward rather than stored (storing costs T N 4 bytes, the time
of the recompute). All products take the inputs' dtype as operands (bf16 stays bf16) and
accumulate in float32; A and dS are rounded to that dtype before their GEMMs.

Memory. The (rows, N) float32 temporaries (G, S, dA, dS) are bounded by processing the
tokens in blocks of `rows` = max_block_elements // N (a `lax.scan`; dU and dV accumulate
in float32 across blocks): 2^29 elements is 2 GiB per temporary, one block for the
headline's 4096 tokens, four for 16,384.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from omnimoe import reference
from omnimoe.pallas import common

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  max_block_elements: int = 2 ** 29  # rows x N of one token block's float32 temporaries


def block_rows(tokens: int, num_experts: int, config: DenseConfig) -> int:
  """Tokens per block: all of them if they fit, else a multiple of 8 (at least 8)."""
  rows = config.max_block_elements // num_experts
  return tokens if rows >= tokens else max(8, rows // 8 * 8)


def _routing_matrix(weights, indices, num_experts: int):
  """G (rows, N) float32: each pair's weight at (t, e); duplicates add, bad ids drop."""
  valid = (indices >= 0) & (indices < num_experts)
  ids = jnp.where(valid, indices, num_experts)
  t = lax.broadcasted_iota(jnp.int32, ids.shape, 0)
  return jnp.zeros((ids.shape[0], num_experts), F32).at[t, ids].add(
      weights.astype(F32), mode="drop")


def _blocks(a, rows: int, fill):
  """(T, ...) -> (ceil(T / rows), rows, ...), padding the last block with `fill`."""
  pad = -a.shape[0] % rows
  a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
  return a.reshape(-1, rows, *a.shape[1:])


def _unblock(a, tokens: int):
  return a.reshape(-1, *a.shape[2:])[:tokens]


def _forward_block(x, up, down, weights, indices, activation):
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  g = _routing_matrix(weights, indices, up.shape[0])
  h = reference.ACTIVATIONS[activation](common.dot(x.astype(cdt), up.T.astype(cdt)))
  return common.dot((g * h).astype(cdt), down.astype(cdt)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _dense_op(x, up, down, weights, indices, activation, rows):
  blocks = (_blocks(x, rows, 0), _blocks(weights, rows, 0), _blocks(indices, rows, -1))
  y = lax.map(lambda b: _forward_block(b[0], up, down, b[1], b[2], activation), blocks)
  return _unblock(y, x.shape[0])


def _fwd(x, up, down, weights, indices, activation, rows):
  y = _dense_op(x, up, down, weights, indices, activation, rows)
  return y, (x, up, down, weights, indices)


def _bwd(activation, rows, residuals, dy):
  x, up, down, weights, indices = residuals
  num_experts = up.shape[0]
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)

  def block(grads, b):
    xb, wb, ib, dyb = b
    g = _routing_matrix(wb, ib, num_experts)
    h, dh = common.activation_with_grad(activation, common.dot(xb.astype(cdt), up.T.astype(cdt)))
    da = common.dot(dyb.astype(cdt), down.T.astype(cdt))
    ds = (da * g * dh).astype(cdt)
    a = (g * h).astype(cdt)
    dup, ddown = grads
    dup = dup + common.dot(ds.T, xb.astype(cdt))
    ddown = ddown + common.dot(a.T, dyb.astype(cdt))
    valid = (ib >= 0) & (ib < num_experts)
    dw = jnp.where(valid, jnp.take_along_axis(da * h, jnp.where(valid, ib, 0), axis=1), 0)
    return (dup, ddown), (common.dot(ds, up.astype(cdt)), dw)

  zeros = jnp.zeros(up.shape, F32)
  blocks = (_blocks(x, rows, 0), _blocks(weights, rows, 0), _blocks(indices, rows, -1),
            _blocks(dy, rows, 0))
  (dup, ddown), (dx, dw) = lax.scan(block, (zeros, zeros), blocks)
  tokens = x.shape[0]
  return (_unblock(dx, tokens).astype(x.dtype), dup.astype(up.dtype),
          ddown.astype(down.dtype), _unblock(dw, tokens).astype(weights.dtype), None)


_dense_op.defvjp(_fwd, _bwd)


def atomic_experts_dense(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                         indices: jax.Array, *, activation: str = "silu",
                         config: DenseConfig = DenseConfig()) -> jax.Array:
  """`y_t = sum_k act(<x_t, up[e_tk]>) * weights_tk * down[e_tk]`, (T, d) in x.dtype.

  Same contract as `omnimoe.ops.atomic_experts` (which validates inputs); ids outside
  [0, N) contribute nothing, duplicate pairs add up. Differentiable in x, up, down and
  weights; gradients in the dtypes of their inputs, accumulated in float32. Costs
  4 T N d flops forward whatever k: for the dense regime only (`expert_ops.choose_path`).
  """
  if config.max_block_elements < 1:
    raise ValueError(f"max_block_elements must be >= 1, got {config.max_block_elements}")
  if x.shape[0] == 0:
    return jnp.zeros(x.shape, x.dtype)
  rows = block_rows(x.shape[0], up.shape[0], config)
  return _dense_op(x, up, down, weights, indices, activation, rows)
