"""Atomic experts in the dense regime as tensor-core GEMMs over all N experts.

Reference: `omnimoe.reference.atomic_experts` (values) and its autodiff (gradients).
This file holds no Pallas kernel: in this regime XLA's GEMMs (cuBLAS) beat our kernels.

Why. With k in the thousands each expert serves many tokens (the paper's headline:
T = 4096, k = 4096, N = 102,400 = 320 x 320, d = 1024: T k / N = 164 tokens per expert, 4 %
of the (token, expert) grid routed). A token-centric pass gathers two table rows per pair
(16.7 M pairs, ~68 GB); the expert-line kernels (`expert_lines`) tile the routed pairs
onto tensor cores but pay row gathers, float32 atomics and an incidence build per call.
The whole grid as two GEMMs does 4 T N d flops (1.7 TFLOP) whatever the routing, at the
tensor cores' full rate, and the routing enters only at the routed pairs. No tile is
skipped because none is empty: at the headline every 64-token block routes pairs to every
block of 64 experts (`experiments/tile_occupancy.py`, RESULTS.md). Measured on
one H200 (bf16, the headline shapes, routing from the exact router; experiments/
RESULTS.md): `expert_lines` forward 19.5 ms (its incidence build alone 1.7 ms); this
file's forward 3.96 ms with float32 (T, N) grids and a dense routing matrix, 2.96 ms as
below (fwd+bwd 9.44 -> 9.26 ms, while the backward still recomputed S; keeping the
pair scores instead left the whole FFN's fwd+bwd unchanged, 10.80 -> 10.82 ms: the grid
GEMMs, not the S recompute, set the time). So the Pallas path hands this regime to
this file (`expert_ops.choose_path`); the expert-line kernels stay selectable
(`path="lines"`).

Maths (pairs (t, e_tj) with weights w_tj; duplicate pairs add up, ids outside [0, N)
drop, as in the reference):
  forward    S = x U^T;  A = scatter_tj(w act(S[t, e_tj]));  y = A V
  backward   dA = dy V^T;  dS = scatter_tj(dA[t, e_tj] w act'(S[t, e_tj]));  A (kept);
             dx = dS U;  dU = dS^T x;  dV = A^T dy;
             dweights_tj = dA[t, e_tj] act(S[t, e_tj])
Only the GEMMs touch the whole (T, N) grid: S and dA are read at the T k routed pairs,
A and dS are scattered from them (into zero-filled grids), so the elementwise work is
O(T k), not O(T N). The grids are written in the inputs' dtype (bf16 stays bf16, float32
accumulation inside the GEMMs; the pair values are computed in float32; duplicate pairs,
which the router never makes, add up in the grid's dtype). Callers that pass the router's
ids promise `unique_indices`, and A and dS are then scattered with stores instead of
atomic adds (headline FFN fwd 3.47 -> 3.40 ms, fwd+bwd 9.25 -> 9.08; RESULTS.md run 6).
The backward needs S only at the pairs: the forward keeps s_tj = S[t, e_tj] (T k float32,
67 MB at the headline) instead of the grid, so fwd+bwd runs six grid GEMMs (2 forward,
4 backward), not seven.

Memory. The (rows, N) temporaries (S, A; dA, A, dS) are bounded by processing the tokens
in blocks of at most max_block_elements // N rows, balanced (`block_rows`; a `lax.scan`;
dU and dV accumulate in float32 across blocks; with one block they leave the GEMMs in the
tables' dtype). The default, `MAX_GRID_ELEMENTS` (4 GiB a grid in bf16), makes one block
up to 20,971 tokens at N = 102,400.
With one block the forward's A is kept for the backward (`keep_grid`; T N elements,
0.84 GB at the headline's 4096 tokens) instead of being zero-filled and scattered again;
`keep_grid=False` trades that memory back for the rebuild. Measured (one H200, the
headline, whole FFN): fwd+bwd 10.50 -> 9.25 ms with A kept (RESULTS.md, run 5). At
16,384 tokens (one H100, the whole FFN, RESULTS.md "Table A on one H100"), one block
against four of 2^29 elements: fwd+bwd 37.6 -> 31.7 ms at k = 1024, peak memory 3.7 ->
10.7 GiB (the forward alone 2.2 -> 6.8); on the rule path (`expert_rule`, k = 4096)
37.1 -> 33.5 ms, 7.4 -> 10.4 GiB. Training with many such layers keeps one A per layer:
lower `max_block_elements` or set `keep_grid=False` where that memory is short.
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


# The most elements of one (rows, N) grid by default, here and for `expert_rule`'s S
# groups: XLA programs with intermediates past 2^31 elements have ended in illegal memory
# accesses on the GPU (`reference.MAX_ELEMENTS`).
MAX_GRID_ELEMENTS = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  max_block_elements: int = MAX_GRID_ELEMENTS  # rows x N of one token block's (rows, N) grids
  keep_grid: bool = True  # one token block: keep the forward's grid A for the backward


def block_rows(tokens: int, num_experts: int, config: DenseConfig) -> int:
  """Tokens per block: all of them if they fit, else a multiple of 8 (at least 8) that
  splits them into the fewest blocks allowed, evenly: the last block's padding rows cost
  whole grid rows of GEMM and grid-pass work (16,384 tokens at N = 102,400 in blocks of
  2^29 elements: 4 x 4096 rows, where the largest allowed block, 5240, would pad them to
  20,960)."""
  most = config.max_block_elements // num_experts
  if most >= tokens:
    return tokens
  most = max(8, most // 8 * 8)
  return common.cdiv(common.cdiv(tokens, common.cdiv(tokens, most)), 8) * 8


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static choices of one call: activation, tokens per block, whether the forward's
  grid A is kept (one block), and whether pairs are unique per token (stores, not adds)."""
  activation: str
  rows: int
  keep: bool
  unique: bool


def _pair_ids(indices, num_experts: int):
  """valid (rows, k), ids clamped into range for gathers, and ids for scatters where an
  invalid pair's id is sent past N (N + its slot, so that they stay distinct and drop)."""
  valid, safe = reference.valid_ids(indices, num_experts)
  past = num_experts + lax.broadcasted_iota(jnp.int32, indices.shape, 1)
  return valid, safe, jnp.where(valid, indices, past)


def _scatter_pairs(values, ids, num_experts: int, dtype, unique: bool):
  """(rows, N) in dtype, zero but for each pair's value at (t, e); ids past N drop.
  Duplicates add up, unless `unique` promises there are none: then plain stores."""
  t = lax.broadcasted_iota(jnp.int32, ids.shape, 0)
  grid = jnp.zeros((ids.shape[0], num_experts), dtype).at[t, ids]
  if unique:
    return grid.set(values.astype(dtype), mode="drop", unique_indices=True)
  return grid.add(values.astype(dtype), mode="drop")


def grid_dot(a, b, dtype):
  """a @ b with float32 accumulation, written in `dtype` (the (rows, N) grids in bf16 for
  bf16 inputs: half the traffic of float32 grids); float32 operands in full precision."""
  highest = lax.Precision.HIGHEST if a.dtype == F32 else None
  return jnp.dot(a, b, preferred_element_type=dtype, precision=highest)


def _forward_block(x, up, down, weights, indices, plan: _Plan):
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  valid, safe, drop = _pair_ids(indices, up.shape[0])
  s = grid_dot(x.astype(cdt), up.T.astype(cdt), cdt)
  s_pairs = jnp.take_along_axis(s, safe, axis=1).astype(F32)
  act = reference.ACTIVATIONS[plan.activation]
  a_pairs = jnp.where(valid, act(s_pairs) * weights.astype(F32), 0)
  a = _scatter_pairs(a_pairs, drop, up.shape[0], cdt, plan.unique)
  return common.dot(a, down.astype(cdt)).astype(x.dtype), s_pairs, a


def _forward(x, up, down, weights, indices, plan: _Plan):
  """y, the pair scores s (T, k) float32 that the backward keeps, and with `plan.keep`
  (all tokens in one block) the grid A, else None."""
  if plan.keep:
    return _forward_block(x, up, down, weights, indices, plan)
  blocks = [reference.token_blocks(a, plan.rows, fill) for a, fill in
            ((x, 0), (weights, 0), (indices, -1))]
  y, s_pairs = lax.map(lambda b: _forward_block(b[0], up, down, b[1], b[2], plan)[:2],
                       blocks)
  return (*(reference.unblock_tokens(a, x.shape[0]) for a in (y, s_pairs)), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _dense_op(x, up, down, weights, indices, plan):
  return _forward(x, up, down, weights, indices, plan)[0]


def _fwd(x, up, down, weights, indices, plan):
  y, s_pairs, a = _forward(x, up, down, weights, indices, plan)
  return y, (x, up, down, weights, indices, s_pairs, a)


def _backward_block(b, up, down, plan: _Plan, cdt, a=None):
  """One token block's grids and per-token gradients: (dS, A), (dx, dweights); A is
  rebuilt from the pairs unless given."""
  xb, wb, ib, sb, dyb = b
  num_experts = up.shape[0]
  valid, safe, drop = _pair_ids(ib, num_experts)
  da = grid_dot(dyb.astype(cdt), down.T.astype(cdt), cdt)
  h, dh = common.activation_with_grad(plan.activation, sb)
  da_pairs = jnp.where(valid, jnp.take_along_axis(da, safe, axis=1).astype(F32), 0)
  w = wb.astype(F32)
  if a is None:
    a = _scatter_pairs(h * w, drop, num_experts, cdt, plan.unique)
  ds = _scatter_pairs(da_pairs * w * dh, drop, num_experts, cdt, plan.unique)
  return (ds, a), (common.dot(ds, up.astype(cdt)), da_pairs * h)


def _bwd(plan, residuals, dy):
  x, up, down, weights, indices, s_pairs, kept_a = residuals
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  blocks = [reference.token_blocks(a, plan.rows, fill) for a, fill in
            ((x, 0), (weights, 0), (indices, -1), (s_pairs, 0), (dy, 0))]
  if blocks[0].shape[0] == 1:
    # One block: dU, dV leave the GEMMs in the tables' dtype (float32 accumulation inside),
    # skipping a float32 (N, d) accumulator and its cast (~2.5 GB of traffic at the headline).
    (ds, a), per_token = _backward_block([b[0] for b in blocks], up, down, plan, cdt,
                                         kept_a)
    dup = grid_dot(ds.T, blocks[0][0].astype(cdt), up.dtype)
    ddown = grid_dot(a.T, blocks[4][0].astype(cdt), down.dtype)
    dx, dw = (p[None] for p in per_token)
  else:
    def block(grads, b):
      (ds, a), per_token = _backward_block(b, up, down, plan, cdt)
      dup, ddown = grads
      return (dup + common.dot(ds.T, b[0].astype(cdt)),
              ddown + common.dot(a.T, b[4].astype(cdt))), per_token

    zeros = jnp.zeros(up.shape, F32)
    (dup, ddown), (dx, dw) = lax.scan(block, (zeros, zeros), blocks)
  dx, dw = (reference.unblock_tokens(a, x.shape[0]) for a in (dx, dw))
  return (dx.astype(x.dtype), dup.astype(up.dtype), ddown.astype(down.dtype),
          dw.astype(weights.dtype), None)


_dense_op.defvjp(_fwd, _bwd)


def atomic_experts_dense(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                         indices: jax.Array, *, activation: str = "silu",
                         config: DenseConfig = DenseConfig(),
                         unique_indices: bool = False) -> jax.Array:
  """`y_t = sum_k act(<x_t, up[e_tk]>) * weights_tk * down[e_tk]`, (T, d) in x.dtype.

  Same contract as `omnimoe.ops.atomic_experts` (which validates inputs; empty inputs,
  no tokens or k = 0, are answered by `expert_ops.atomic_experts` before this); ids outside
  [0, N) contribute nothing, duplicate pairs add up (undefined if `unique_indices`
  promised there were none: the grids are then written by stores, not atomic adds).
  Differentiable in x, up, down and weights; gradients in the dtypes of their inputs,
  accumulated in float32. Costs 4 T N d flops forward whatever k: for the dense regime
  only (`expert_ops.choose_path`).
  """
  if config.max_block_elements < 1:
    raise ValueError(f"max_block_elements must be >= 1, got {config.max_block_elements}")
  rows = block_rows(x.shape[0], up.shape[0], config)
  plan = _Plan(activation, rows, config.keep_grid and rows == x.shape[0], unique_indices)
  return _dense_op(x, up, down, weights, indices, plan)
