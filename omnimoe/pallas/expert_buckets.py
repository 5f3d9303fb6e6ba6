"""Pair scores in expert-bucket order: `<vec_t, table[e]>` for every (token, expert) pair.

Reference: `omnimoe.reference.pair_scores` (s = <x, U[e]> in the forward, da = <dy, V[e]>
in the backward); the custom VJP that uses this is in `expert_ops` (`pair_scores="buckets"`).

Why. The token kernels (`expert_tokens`) gather one table row per pair in token order, so
a row that serves several tokens is read from memory once per pair unless it is still
in L2 (at T = 4096, k = 32, N = 65,536 a used row serves ~2.3 pairs, and the tables,
268 MB in bf16, do not fit the 50 MB L2). The backward already groups the pairs by
expert bucket for the table gradients (`expert_tables.bucket`). Made once in the
forward and kept, that grouping lets the scores read each used row about once: a
program takes `block_p` consecutive pairs of the bucket order, whose experts lie in a
few consecutive buckets, so the pairs of one row run close together in time and all but
the first find it in L2. What is gathered per pair instead is the token's row of the
small (T, d) vec (x or dy: 8 MB, L2-resident). The forward's U side and the backward's V
side run here; the other side of each (y = sum a V[e], dx = sum ds U[e]) stays
token-centric (`expert_tokens.pair_combine`): a sum into the token's own row, which in
bucket order would need atomics on (T, d) floats.

Layout. Program i takes positions [i block_p, (i + 1) block_p) of the bucket order;
positions past `starts[-1]` (pairs whose id lies outside [0, N), which no bucket holds)
are masked. d streams in tiles of `block_d` (16-byte loads of both rows), multiplied
into an elementwise float32 accumulator that is reduced over d once. Each score is
stored at its pair's own position `order[p]` of the (T k,) output, which starts as
zeros: a pair that no bucket holds keeps score 0.

Equivalent JAX code:
  s = zeros(T k).at[order[:P]].set(einsum("pd,pd->p", vec[token[:P]], table[expert[:P]]))
  with P = starts[-1]
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

from omnimoe.pallas import common
from omnimoe.pallas.expert_tables import Buckets


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  block_p: int = 64   # pairs per program
  block_d: int = 64   # hidden-dimension tile
  num_warps: int = 2
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_p", "block_d", "num_warps"):
      common.check_pow2(f"ScoreConfig.{name}", getattr(self, name))


def _scores_kernel(starts_ref, order_ref, token_ref, expert_ref, vec_ref, table_ref, zeros_ref,
                   out_ref, *, block_p: int, block_d: int):
  del zeros_ref  # aliased with out_ref
  pairs = order_ref.shape[0]
  d = vec_ref.shape[1]
  pos, _, pos_c = common.token_block(block_p, pairs)
  live = pos < starts_ref[starts_ref.shape[0] - 1]
  t = plt.load(token_ref.at[pos_c], mask=live, other=0)[:, None]
  e = plt.load(expert_ref.at[pos_c], mask=live, other=0)[:, None]

  def tile(c, acc):
    _, cols, in_d = common.lanes(block_d, d, c)
    mask = live[:, None] & in_d[None, :]
    v = plt.load(vec_ref.at[t, cols[None, :]], mask=mask, other=0.0)
    u = plt.load(table_ref.at[e, cols[None, :]], mask=mask, other=0.0)
    return acc + v.astype(jnp.float32) * u.astype(jnp.float32)

  acc = lax.fori_loop(0, common.cdiv(d, block_d), tile,
                      jnp.zeros((block_p, block_d), jnp.float32))
  pair = plt.load(order_ref.at[pos_c], mask=live, other=0)
  plt.store(out_ref.at[jnp.where(live, pair, pairs)], jnp.sum(acc, axis=1), mask=live)


def bucket_scores(vec: jax.Array, table: jax.Array, buckets: Buckets, k: int, *,
                  config: ScoreConfig, interpret: bool) -> jax.Array:
  """`<vec_t, table[e_tj]>` for every pair, (T, k) float32, 0 for pairs that no bucket
  holds (ids outside [0, N)); `buckets` from `expert_tables.bucket` on the (T, k) ids."""
  tokens = vec.shape[0]
  pairs = tokens * k
  block_d = min(config.block_d, common.pow2(vec.shape[1]))
  kernel = functools.partial(_scores_kernel, block_p=config.block_p, block_d=block_d)
  scores = common.triton_call(
      kernel, out_shape=jax.ShapeDtypeStruct((pairs,), jnp.float32),
      grid=(common.cdiv(pairs, config.block_p),), num_warps=config.num_warps,
      num_stages=config.num_stages, interpret=interpret, name="atomic_experts_bucket_scores",
      input_output_aliases={6: 0})(
          buckets.starts, buckets.order, buckets.token, buckets.expert, vec, table,
          jnp.zeros((pairs,), jnp.float32))
  return scores.reshape(tokens, k)
