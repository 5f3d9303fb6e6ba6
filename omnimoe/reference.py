"""Plain-jnp reference implementations: the oracle every kernel is tested against.

Nothing here is tuned; everything here is written to be obviously right. The public,
validated entry points are in `omnimoe.ops`; these functions assume valid inputs.

Conventions shared with the kernels:
  * Expert e of the Cartesian grid sits at row i = e // n_y, column j = e % n_y.
  * Top-k tie rule: scores in descending order; equal scores are ordered by ascending
    flat expert index e. (This makes product-key search exact; see `cartesian_topk`.)
  * A (token, expert) pair whose expert index lies outside [0, N) contributes nothing
    (forward and backward); kernels clamp-and-mask to the same effect.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "identity": lambda s: s,
}
# Expert activations: a scalar one applied to <x, up[e]>, or "swiglu", the paper's wording,
# `silu(<x, gate[e]>) * <x, up[e]>` with a third per-expert table `gate`.
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "swiglu")


def swiglu(gate_up: jax.Array) -> jax.Array:
  """silu(gate) * up of a stacked (..., 2, hidden) projection (gate first): the SwiGLU MLPs'
  activation (`layers.SharedMLP`, `layers.CoarseMoE`; the benchmarks' layers)."""
  return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


# The largest intermediate the oracle materialises at once (elements): a (T, k, d) gather
# of table rows, or T candidate grids of k x k sums. Larger ones run in chunks (of pairs,
# of tokens). Why: on one H200 (JAX 0.11.2) XLA programs whose intermediates passed 2^31
# elements (a 4096 x 1250 x 1024 gather; 40,960 grids of 250 x 250 candidates) ended in
# illegal memory accesses, and chunks also bound the oracle's memory.
MAX_ELEMENTS = 2 ** 30


def cartesian_topk(lx: jax.Array, ly: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k of `lx[t, i] + ly[t, j]` over the grid, by product-key search.

  A pair (i, j) in the true top-k can only use a row among the top-k rows of lx and a
  column among the top-k columns of ly: any other row i' is beaten by the k candidate
  rows paired with the same column (higher score, or equal score and a lower flat
  index under our tie rule). So we rank k x k candidates instead of n_x * n_y scores:
  O(n + k^2) per token. One caveat: "higher score" assumes lx[i] > lx[i'] gives a
  higher float sum, but float addition can round fl(lx[i] + ly[j]) and
  fl(lx[i'] + ly[j]) to the same value (ly tiny against the ulp of lx), and then a
  lower-id row (or column) outside the candidates wins the tie at the k-th place (two
  sums within half an ulp of the k-th sum; the test data has lx near -1e8, where the
  float32 spacing is 8; sums that overflow to +-inf tie the same way). That is the one
  difference from the full-grid top-k, which `router_threshold` (k > 64) computes
  exactly; `tests/test_pallas_router.py` pins it.
  On ordinary gates it was not seen: `experiments/topk_exactness.py` counts 0 of 40,960
  tokens at n = 256 and 0 of 10,240 at n = 1024 (k = 32, random log-softmax gates).

  With the candidate rows and columns put in ascending id order, the row-major candidate
  grid is in ascending flat-id order, so `lax.top_k` (which puts equal values in
  ascending position) applies the tie rule by itself.

  Args:
    lx: (T, n_x) row scores (log-probabilities). ly: (T, n_y) column scores.
    k: number of experts per token, 1 <= k <= n_x * n_y.
  Returns:
    scores (T, k) float32, descending; indices (T, k) int32 flat expert ids.
  """
  tokens = lx.shape[0]
  rows = max(1, MAX_ELEMENTS // (min(k, lx.shape[1]) * min(k, ly.shape[1])))
  if tokens <= rows:
    return _candidate_topk(lx, ly, k)
  scores, ids = lax.map(lambda pair: _candidate_topk(*pair, k),
                        (token_blocks(lx, rows, 0), token_blocks(ly, rows, 0)))
  return unblock_tokens(scores, tokens), unblock_tokens(ids, tokens)


def token_blocks(a: jax.Array, rows: int, fill) -> jax.Array:
  """(T, ...) -> (ceil(T / rows), rows, ...), the last block padded with `fill`: for
  `lax.map` / `lax.scan` over blocks of tokens that bound an intermediate's size."""
  a = jnp.pad(a, [(0, -a.shape[0] % rows)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
  return a.reshape(-1, rows, *a.shape[1:])


def unblock_tokens(a: jax.Array, tokens: int) -> jax.Array:
  """The inverse of `token_blocks`: (blocks, rows, ...) -> (tokens, ...)."""
  return a.reshape(-1, *a.shape[2:])[:tokens]


def _candidate_topk(lx: jax.Array, ly: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`cartesian_topk` of a block of tokens, all their k x k candidate grids at once."""
  n_y = ly.shape[1]
  rows, row_scores = _top_ids_ascending(_unsigned_zero(lx.astype(jnp.float32)), k)
  cols, col_scores = _top_ids_ascending(_unsigned_zero(ly.astype(jnp.float32)), k)
  cand = row_scores[:, :, None] + col_scores[:, None, :]
  scores, pos = lax.top_k(_unsigned_zero(cand.reshape(cand.shape[0], -1)), k)
  row = jnp.take_along_axis(rows, pos // cols.shape[1], axis=1)
  col = jnp.take_along_axis(cols, pos % cols.shape[1], axis=1)
  return scores, row * n_y + col


def _unsigned_zero(v: jax.Array) -> jax.Array:
  """-0.0 -> +0.0, so that equal scores tie exactly in `lax.top_k` (which ranks +0.0 above
  -0.0). A select, not `v + 0.0`, which XLA simplifies to `v` under jit; applied as an
  offset without gradient, so that d/dv stays 1 at zero (and +-inf stay as they are)."""
  return v + lax.stop_gradient(jnp.where(v == 0, -v, jnp.zeros_like(v)))


def _top_ids_ascending(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The ids of the min(k, n) best entries of each row (ties: lower id) in ascending id
  order, with their scores."""
  best, ids = lax.top_k(scores, min(k, scores.shape[1]))
  ids, best = lax.sort((ids, best), dimension=1, num_keys=1)
  return ids, best


def valid_ids(indices: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Which pairs name an expert in [0, N), and the ids with the others replaced by 0."""
  valid = (indices >= 0) & (indices < num_experts)
  return valid, jnp.where(valid, indices, 0)


def _pair_chunk(indices: jax.Array, d: int) -> int:
  """Pairs per token in one gather: all k when the (T, k, d) gather fits MAX_ELEMENTS."""
  tokens, k = indices.shape
  return max(1, min(k, MAX_ELEMENTS // max(1, tokens * d)))


def _chunks(a: jax.Array, chunk: int, fill) -> jax.Array:
  """(T, k) -> (ceil(k / chunk), T, chunk), the last chunk padded with `fill`."""
  return jnp.swapaxes(token_blocks(a.T, chunk, fill), 1, 2)


def _gathered_scores(vec, table, indices):
  valid, safe = valid_ids(indices, table.shape[0])
  s = jnp.einsum("td,tkd->tk", vec.astype(jnp.float32),
                 jnp.take(table, safe, axis=0).astype(jnp.float32))
  return jnp.where(valid, s, 0.0)


def _gathered_combine(coef, table, indices):
  valid, safe = valid_ids(indices, table.shape[0])
  return jnp.einsum("tk,tkd->td", jnp.where(valid, coef.astype(jnp.float32), 0.0),
                    jnp.take(table, safe, axis=0).astype(jnp.float32))


def pair_scores(vec: jax.Array, table: jax.Array, indices: jax.Array) -> jax.Array:
  """`<vec_t, table[e_tk]>` for every pair: (T, k) float32, 0 where e_tk is outside [0, N).

  The first half of the expert op (s from x and U; in backward, da from dy and V)."""
  chunk = _pair_chunk(indices, table.shape[1])
  if chunk == indices.shape[1]:
    return _gathered_scores(vec, table, indices)
  s = lax.map(lambda idx: _gathered_scores(vec, table, idx), _chunks(indices, chunk, -1))
  return jnp.moveaxis(s, 0, 1).reshape(indices.shape[0], -1)[:, :indices.shape[1]]


def pair_combine(coef: jax.Array, table: jax.Array, indices: jax.Array) -> jax.Array:
  """`sum_k coef_tk table[e_tk]`: (T, d) float32; pairs with e_tk outside [0, N) add nothing.

  The second half of the expert op (y from a and V; in backward, dx from ds and U)."""
  chunk = _pair_chunk(indices, table.shape[1])
  if chunk == indices.shape[1]:
    return _gathered_combine(coef, table, indices)
  add = lambda y, ci: (y + _gathered_combine(ci[0], table, ci[1]), None)
  zeros = jnp.zeros((indices.shape[0], table.shape[1]), jnp.float32)
  return lax.scan(add, zeros, (_chunks(coef, chunk, 0), _chunks(indices, chunk, -1)))[0]


def atomic_experts(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                   indices: jax.Array, activation: str = "silu",
                   gate: jax.Array | None = None) -> jax.Array:
  """Token-centric atomic experts: `y_t = sum_k h_tk * w_tk * down[e_tk]`, where
  `h_tk = act(<x_t, up[e_tk]>)`, or `silu(<x_t, gate[e_tk]>) * <x_t, up[e_tk]>` for
  activation "swiglu".

  `pair_scores`, then `pair_combine`: gathers a (T, k, d) copy of each table, fine as an
  oracle, memory-bound as a kernel. Accumulates in float32; returns x.dtype.
  """
  valid, _ = valid_ids(indices, up.shape[0])
  s = pair_scores(x, up, indices)
  if activation == "swiglu":
    h = jax.nn.silu(pair_scores(x, gate, indices)) * s
  else:
    h = ACTIVATIONS[activation](s)
  a = h * weights.astype(jnp.float32) * valid
  return pair_combine(a, down, indices).astype(x.dtype)
