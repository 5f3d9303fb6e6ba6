"""Product-key router top-k as one fused Pallas (Triton) kernel.

Reference: `omnimoe.reference.cartesian_topk` (same outputs, same tie rule: scores in
descending order, equal scores by ascending flat expert id `i * n_y + j`; per-axis ties
by lower index). Exactness of the product-key search is argued there.

Design. One program owns `block_t` tokens and does all of their work in registers:
  1. per-axis top-k of `lx` and `ly`: `min(k, n)` rounds of an arg-max over the row
     (Triton's arg-max breaks ties to the lower index, our per-axis rule), the winner
     knocked out after each round. Scores are compared as order-preserving int32 keys
     (IEEE bits with the negative half flipped, -0.0 folded into +0.0), so that a
     knocked-out or padded entry (INT_MIN) sorts below every real score, -inf included.
  2. the k_x x k_y candidate sums, k rounds of: max key, then the lowest flat id among
     the entries holding it (that is the tie rule), knocked out.
That is O(k n + k^3) compare-and-select work per token, no memory traffic beyond reading
the two rows and writing 2k numbers, and no sort (Triton has none). XLA's `lax.top_k`
with k > 16 sorts whole rows (0.56 ms for the two axes at T=4096, n=1024, k=32, DESIGN.md
section 3); the published Triton kernel takes the top-k of all N sums (59.5 ms at
N=2^20). Rows are padded to a power of two (Triton's array sizes) and masked.
Measured on one H100 (T=4096): 0.163 ms at N=2^20, k=32 (reference in XLA 0.650 ms;
newer upstream Triton 0.34 ms), 0.096 ms at N=65536, 0.059 ms at N=4096, k=16. Two
tokens per program on one warp was the fastest of 7 launch shapes: the arg-max
reductions then never leave the warp. Details: experiments/kernels_notes.md.

k above `MAX_KERNEL_K` goes to `router_threshold` (threshold search + bounded emit,
O(n log n + k) per token, for k in the thousands); n above `MAX_KERNEL_N` falls back to
the reference. Scores are differentiable: a custom JVP (`score_jvp`, shared by both
kernels) gathers the tangents of lx and ly at the chosen experts (the kernels only select).

Equivalent JAX code (per token, ignoring padding):
  ri = argsort(-lx)[:k]; ci = argsort(-ly)[:k]           # stable: lower index first
  cand = (lx[ri][:, None] + ly[ci][None, :]).ravel()
  flat = (ri[:, None] * n_y + ci[None, :]).ravel()
  order = lexsort((flat, -cand))[:k]
  return cand[order], flat[order]
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plt

from omnimoe import reference
from omnimoe.pallas import common

# The fused kernel's k^3 merge loses to the threshold search from k = 48 (n = 320) or 64
# (n = 1024) on, and wins by 2.3-3.4x at k = 32 (H200, T = 4096 and 40960:
# experiments/RESULTS.md, "Path crossover"; `--crossover` in experiments/bench_headline.py).
MAX_KERNEL_K = 32
MAX_KERNEL_N = 16384
_INT_MIN = np.int32(np.iinfo(np.int32).min)
_INT_MAX = np.int32(np.iinfo(np.int32).max)
_SIGN_FLIP = np.int32(0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  block_t: int = 2      # tokens per program
  num_warps: int = 0    # 0: one warp per 2048 elements of the larger in-register array
  num_stages: int = 1
  max_kernel_k: int = MAX_KERNEL_K  # larger k: `router_threshold`


def _ordered_key(v: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order; -0.0 and +0.0 map to the same key, 0.

  The fold is integer arithmetic (negative keys move up by one, so -0.0's -1 meets +0.0's
  0): XLA simplifies `v + 0.0` to `v`, which would keep -0.0 apart wherever XLA compiles
  this (the sorts around the kernels, interpret mode). INT_MIN stays below every float.
  """
  bits = lax.bitcast_convert_type(v, jnp.int32)
  key = bits ^ ((bits >> 31) & _SIGN_FLIP)
  return key - (key >> 31)


def _key_to_float(key: jax.Array) -> jax.Array:
  key = key + (key >> 31)
  return lax.bitcast_convert_type(key ^ ((key >> 31) & _SIGN_FLIP), jnp.float32)


def _axis_topk(ref, rows, row_mask, n: int, count: int, width: int):
  """Positions of the `count` best entries of each row of ref[rows, :n], best first."""
  cols = common.iota(common.pow2(n))[None, :]
  vals = plt.load(ref.at[rows[:, None], cols], mask=row_mask[:, None] & (cols < n),
                  other=0.0).astype(jnp.float32)
  keys = jnp.where(cols < n, _ordered_key(vals), _INT_MIN)
  slots = common.iota(width)[None, :]

  def round_(m, carry):
    keys, picks = carry
    pick = lax.argmax(keys, 1, jnp.int32)[:, None]
    return jnp.where(cols == pick, _INT_MIN, keys), jnp.where(slots == m, pick, picks)

  init = (keys, jnp.zeros((rows.shape[0], width), jnp.int32))
  _, picks = lax.fori_loop(0, count, round_, init)
  got = row_mask[:, None] & (slots < count)
  vals = plt.load(ref.at[rows[:, None], picks], mask=got, other=0.0).astype(jnp.float32)
  return vals, picks


def _router_kernel(lx_ref, ly_ref, scores_ref, idx_ref, *, k: int, block_t: int):
  tokens, n_x = lx_ref.shape
  n_y = ly_ref.shape[1]
  kx, ky = min(k, n_x), min(k, n_y)
  wx, wy, wk = common.pow2(kx), common.pow2(ky), common.pow2(k)
  t, live, rows = common.token_block(block_t, tokens)
  rv, ri = _axis_topk(lx_ref, rows, live, n_x, kx, wx)
  cv, ci = _axis_topk(ly_ref, rows, live, n_y, ky, wy)

  ok = (common.iota(wx) < kx)[:, None] & (common.iota(wy) < ky)[None, :]
  keys = jnp.where(ok[None], _ordered_key(rv[:, :, None] + cv[:, None, :]), _INT_MIN)
  flat = ri[:, :, None] * n_y + ci[:, None, :]
  keys = keys.reshape(block_t, wx * wy)
  flat = flat.reshape(block_t, wx * wy)
  slots = common.iota(wk)[None, :]

  def round_(m, carry):
    keys, best_key, best_idx = carry
    top = jnp.max(keys, axis=1, keepdims=True)
    pick = jnp.min(jnp.where(keys == top, flat, _INT_MAX), axis=1, keepdims=True)
    return (jnp.where(flat == pick, _INT_MIN, keys), jnp.where(slots == m, top, best_key),
            jnp.where(slots == m, pick, best_idx))

  zeros = jnp.zeros((block_t, wk), jnp.int32)
  _, best_key, best_idx = lax.fori_loop(0, k, round_, (keys, zeros, zeros))
  out = (t[:, None], slots)
  mask = live[:, None] & (slots < k)
  plt.store(scores_ref.at[out], _key_to_float(best_key), mask=mask)
  plt.store(idx_ref.at[out], best_idx, mask=mask)


def _num_warps(config: RouterConfig, n: int, k: int) -> int:
  if config.num_warps:
    return config.num_warps
  elems = config.block_t * max(common.pow2(n), common.pow2(k) ** 2)
  return int(np.clip(elems // 2048, 1, 8))


def score_jvp(select, nondiff_argnums: tuple[int, ...]):
  """`select(lx, ly, *static) -> (scores, idx)` as a `jax.custom_jvp` whose score tangents
  are those of `lx[t, i] + ly[t, j]` at the chosen flat ids `idx = i * n_y + j` (a kernel
  only selects). `nondiff_argnums` are the static arguments, all after lx and ly."""
  select = jax.custom_jvp(select, nondiff_argnums=nondiff_argnums)

  @select.defjvp
  def jvp(*args):
    *static, (lx, ly), (dlx, dly) = args
    scores, idx = select(lx, ly, *static)
    n_y = ly.shape[1]
    dscores = (jnp.take_along_axis(dlx, idx // n_y, axis=1).astype(jnp.float32)
               + jnp.take_along_axis(dly, idx % n_y, axis=1).astype(jnp.float32))
    return (scores, idx), (dscores, np.zeros(idx.shape, jax.dtypes.float0))

  return select


@functools.partial(score_jvp, nondiff_argnums=(2, 3, 4))
def _cartesian_topk(lx, ly, k: int, config: RouterConfig, interpret: bool):
  tokens = lx.shape[0]
  kernel = functools.partial(_router_kernel, k=k, block_t=config.block_t)
  return common.triton_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((tokens, k), jnp.float32),
                 jax.ShapeDtypeStruct((tokens, k), jnp.int32)),
      grid=(common.cdiv(tokens, config.block_t),),
      num_warps=_num_warps(config, max(lx.shape[1], ly.shape[1]), k),
      num_stages=config.num_stages, interpret=interpret, name="cartesian_topk")(lx, ly)


def cartesian_topk(lx: jax.Array, ly: jax.Array, k: int, *, sorted: bool = True,  # noqa: A002
                   config: RouterConfig = RouterConfig(),
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact product-key top-k: (scores (T, k) f32, indices (T, k) int32).

  Same contract as `omnimoe.ops.cartesian_topk` (which validates inputs). Runs the fused
  kernel for k <= config.max_kernel_k (always in sorted order), `router_threshold` above it
  (sorted=False: its own order, see there), both for n <= MAX_KERNEL_N; the reference
  beyond that.
  """
  if max(lx.shape[1], ly.shape[1]) > MAX_KERNEL_N or lx.shape[0] == 0:
    return reference.cartesian_topk(lx, ly, k)
  if k > config.max_kernel_k:
    from omnimoe.pallas import router_threshold  # it imports this module's helpers
    return router_threshold.cartesian_topk(lx, ly, k, sorted=sorted, interpret=interpret)
  return _cartesian_topk(lx, ly, k, config, common.resolve_interpret(interpret))
