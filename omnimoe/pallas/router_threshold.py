"""Exact Cartesian top-k for k in the thousands: a threshold search, then a bounded emit.

Reference: `omnimoe.reference.cartesian_topk` (same set of k experts, same tie rule:
among equal float32 sums `fl(lx[t, i] + ly[t, j])` the lower flat id `i * n_y + j` wins;
-0.0 ties with +0.0, -inf ranks below every finite sum). With `sorted=True` the output is
also in the reference's order; `sorted=False` returns the same set in the kernel's order
(below), which is all the expert op needs.

Why not the fused kernel (`router_topk`, k <= MAX_KERNEL_K): it ranks k x k candidates
(at best ~k ln k of them) by a width x width comparison in registers, O(k^2) and more
per token, measured slower from k = 128 on; and XLA's exact `lax.top_k` over all
N = 102,400 sums takes 29 ms at T = 4096, k = 4096 (DESIGN.md section 3b). Here no token
ever holds its N sums; the cost is O(n log n) to sort one axis plus O(n_x log n_y) per
bisection step plus O(k log n_x) to emit, per token.

Design. Outside the kernels, XLA sorts each token's ly in descending order (equal values:
lower column id first) and keeps the column ids: one (T, n_y) row sort, no sort of the
rows (rows stay in id order, which is what the tie rule and the emit order need).
  A. `_threshold_kernel`, one program per `block_t` tokens. theta_t, the k-th largest
     sum, is found by bisection over order-preserving int32 keys of float32 (router_topk's
     `_ordered_key`): count(v) = sum_i c_i(v), c_i(v) = #{j : key(fl(lx_i + ly_j)) >= v}.
     For a fixed row i, fl(lx_i + ly_j) is monotone in ly_j, so row i's qualifying columns
     are a prefix of the sorted column list and c_i(v) is a binary search over it,
     vectorised over rows x tokens (gathers through the ref). Improvement over plain
     bisection: each row keeps its counts at the current bracket ends, c_i(hi) <= c_i(mid)
     <= c_i(lo), so a step searches only between them, with a trip count of
     log2(max bracket width) that drops from log2(n_y) to ~0 as the bracket narrows (the
     bisection stops when every token's bracket is closed, <= 32 steps; most cost a few
     probes per row, and the first ~8 about half of the kernel's time). A midpoint that
     exactly k sums reach closes the bracket at once (at n = 320, k = 4096, random
     log-softmax rows: 16.5 steps on average instead of 23.6, numpy replay); theta is
     then the least of those k sums (each row's last kept one), and all k are kept (the
     tie step below keeps every sum counted in eq, cut row r its last row with any).
     Otherwise, at the end gt_i = c_i(key(theta) + 1), eq_i = c_i(key(theta)) - gt_i,
     and the m = k - sum(gt) ties to keep are the first m in ascending flat id: the cut
     row r is where the running sum of eq reaches m, and within row r the tied columns
     are found in *column id* order (a cumsum over the unsorted ly row), not in sorted
     order: two different ly values can round to the same sum, so a row's tied run of the
     sorted list need not be in ascending j. The kept set is then exactly
        fl(lx_i + ly_j) > theta  or  (fl(lx_i + ly_j) == theta and i * n_y + j <= cut),
     the rule `threshold` returns (this stage alone, for the tests and the stage timings
     of experiments/bench_headline.py). The kernel also writes each row's running total
     of kept pairs (`ends`, (T, n_x)).
  B. `_emit_kernel` writes the k pairs without sorting. Row i keeps a prefix of the sorted
     column list (the cut row: its `gt` prefix, then its kept ties); the kept counts'
     running totals give each row's output offset. Output slot o finds its row by a
     binary search over `ends` (log2(n_x) gathers) and reads its column at sorted position
     o - start(row); the cut row's kept ties are scattered to their slots instead (their
     sorted positions are not a prefix), by a cumsum over that row.
Kernel order (sorted=False), deterministic: rows i ascending; within a row, descending
ly (so non-increasing score), equal ly by ascending column id. sorted=True finishes with
an XLA sort of the (T, k) result by (score descending, id ascending).

All in-kernel arrays are padded to powers of two and masked; no sort, top-k or register
gather inside the kernels. Sums are compared as int32 keys, not as floats: exact whatever
the denormal mode (XLA:CPU, which runs interpret mode, flushes denormals in compares).
Scores are differentiable through `router_topk.score_jvp` (tangents gathered at the ids).
Cost per token at n = 320, k = 4096: ~32 bisection steps x 512 padded rows x a few probes
(9 while the bracket is wide), then k x (9 + 3) gathers to emit; the (T, k) XLA sort of
sorted=True is extra and is what sorted=False avoids. Measured stage times (one H200):
experiments/RESULTS.md, "headline" section.

Equivalent JAX code (per token; `key` = order-preserving int32 of float32):
  ly_s, col = sort ly descending (ties: lower id)          # XLA, outside the kernels
  c(v) = [searchsorted(-key(lx[i] + ly_s), -v, 'right') for i in rows]   # per-row prefix
  theta = max v with sum(c(v)) >= k                        # bisection over int32 keys
  gt = c(theta + 1); eq = c(theta) - gt; m = k - sum(gt)
  r = first row with cumsum(eq) >= m; need = m - sum(eq[:r])
  cut = r * n_y + (the need-th smallest j with fl(lx[r] + ly[j]) == theta)
  kept = gt + eq * (rows < r) + need * (rows == r)
  out = concat over rows i of (i, col[p]) for the first kept[i] sorted positions p
        (row r: its gt prefix, then its tied columns with j <= cut - r * n_y)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

from omnimoe import ops
from omnimoe.pallas import common
from omnimoe.pallas.router_topk import _INT_MAX, _key_to_float, _ordered_key, score_jvp


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
  """Launch parameters; 0 = chosen by size (`_threshold_launch`). The emit defaults were
  measured best on one H200 at T = 4096, n = 320 (RESULTS.md): whole unsorted top-k
  0.344 ms at k = 4096, the other launches tried 0.339-0.372 ms (within the spread)."""
  block_t: int = 0          # tokens per program, threshold kernel
  num_warps: int = 0        # threshold kernel
  emit_block_t: int = 1     # tokens per program, emit kernel
  emit_slots: int = 256     # output slots per token per emit step (power of two)
  emit_num_warps: int = 4
  num_stages: int = 1


def _threshold_launch(config: ThresholdConfig, n_x: int) -> tuple[int, int]:
  """(block_t, num_warps) of the threshold kernel: one token a program, on one warp where
  a token's rows pad to <= 512, else two. Measured on one H200 (T = 4096, RESULTS.md):
  n = 320, 0.19 ms with the column sort against 0.23-0.25 ms for 2-4 warps or 2 tokens;
  n = 1024, 0.52-0.56 ms against 0.55-0.59 ms for two tokens on four warps."""
  small = common.pow2(n_x) <= 512
  return config.block_t or 1, config.num_warps or (1 if small else 2)


def _sum(a: jax.Array, b: jax.Array) -> jax.Array:
  """fl32(a + b) with -0.0 folded into +0.0, as the reference's scores."""
  return _key_to_float(_ordered_key(a + b))


def _bit_length(n: jax.Array) -> jax.Array:
  """Bits of a non-negative int32 below 2**24 (0 for 0), from its float32 exponent."""
  exponent = lax.bitcast_convert_type(n.astype(jnp.float32), jnp.int32) >> 23
  return jnp.maximum(exponent - 126, 0)


def _search(lower, size, below):
  """Per lane, the first position p in [lower, lower + size) with below(p, live) False
  (below must be True then False along the range): log2(max size) masked probes."""
  def probe(_, carry):
    lower, size = carry
    half = size >> 1
    pos = lower + half
    live = size > 0
    go = live & below(pos, live)
    return jnp.where(go, pos + 1, lower), jnp.where(go, size - half - 1, half)

  return lax.fori_loop(0, _bit_length(jnp.max(size)), probe, (lower, size))[0]


def _threshold_kernel(lx_ref, ly_ref, lys_ref, theta_ref, cut_ref, ends_ref, *, k: int,
                      block_t: int):
  tokens, n_x = lx_ref.shape
  n_y = ly_ref.shape[1]
  t, live, tc = common.token_block(block_t, tokens)
  rows = common.iota(common.pow2(n_x))[None, :]
  real = live[:, None] & (rows < n_x)
  lx = plt.load(lx_ref.at[tc[:, None], jnp.minimum(rows, n_x - 1)], mask=real, other=0.0)
  first = plt.load(lys_ref.at[tc, jnp.zeros_like(tc)], mask=live, other=0.0)
  last = plt.load(lys_ref.at[tc, jnp.full_like(tc, n_y - 1)], mask=live, other=0.0)
  # Bracket: count(lo) = N >= k, count(hi) = 0 < k; per row c_i(lo) and c_i(hi).
  lo = _ordered_key(jnp.min(jnp.where(real, lx, jnp.inf), 1) + last)
  hi = _ordered_key(jnp.max(jnp.where(real, lx, -jnp.inf), 1) + first) + 1
  c_lo = jnp.where(real, n_y, 0)

  def sum_at(pos, mask):  # keys of row i's sums at sorted positions pos (block_t, rows)
    ly = plt.load(lys_ref.at[tc[:, None], jnp.clip(pos, 0, n_y - 1)], mask=mask, other=0.0)
    return _ordered_key(lx + ly)

  def is_open(lo, hi):  # a key lies strictly between the bracket's ends
    return lo < hi - 1

  def bisect(carry):
    lo, hi, c_lo, c_hi = carry
    active = is_open(lo, hi)
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow

    def at_least_mid(pos, probe):
      return sum_at(pos, probe) >= mid[:, None]

    c = _search(c_hi, jnp.where(active[:, None], c_lo - c_hi, 0), at_least_mid)
    total = jnp.sum(c, 1)
    up = active & (total >= k)
    down = active & ~up
    # Exactly k sums reach mid: they are the top k; close the bracket on it, keeping c_hi
    # (the counts at a key above them all).
    hi = jnp.where(down, mid, jnp.where(up & (total == k), mid + 1, hi))
    return (jnp.where(up, mid, lo), hi,
            jnp.where(up[:, None], c, c_lo), jnp.where(down[:, None], c, c_hi))

  # Until every bracket of the block is closed (at most 32 steps: int32 keys).
  _, _, ge, gt = lax.while_loop(
      lambda carry: jnp.max(is_open(*carry[:2]).astype(jnp.int32)) > 0, bisect,
      (lo, hi, c_lo, jnp.zeros_like(c_lo)))
  # theta, the k-th best sum: the least of each row's last kept one (one gather a row; the
  # bracket's lower end unless an exact count closed it). After an exact close, eq counts
  # every kept sum below the bracket's upper end, not only those equal to theta; all of
  # them are kept (need = their number), so the kept set and the rule are the same.
  theta = jnp.min(jnp.where(real & (ge > 0), sum_at(ge - 1, real & (ge > 0)), _INT_MAX), 1)

  # Ties: the first `need` of them in ascending flat id, i.e. rows in order, then columns
  # of the cut row r in id order (the unsorted ly row).
  eq = ge - gt
  need = k - jnp.sum(gt, 1)
  r = jnp.min(jnp.where(jnp.cumsum(eq, axis=1) >= need[:, None], rows, n_x), 1)
  before = rows < r[:, None]
  need = need - jnp.sum(jnp.where(before, eq, 0), 1)
  lx_r = plt.load(lx_ref.at[tc, jnp.minimum(r, n_x - 1)], mask=live, other=0.0)
  cols = common.iota(common.pow2(n_y))[None, :]
  ly = plt.load(ly_ref.at[tc[:, None], jnp.minimum(cols, n_y - 1)],
                mask=live[:, None] & (cols < n_y), other=0.0)
  tie = (cols < n_y) & (_ordered_key(lx_r[:, None] + ly) == theta[:, None])
  rank = jnp.cumsum(tie.astype(jnp.int32), axis=1)
  # Fewer ties than need only after an exact close: all of row r is kept, and the cut
  # stays in row r (the emit finds its row from it).
  j = jnp.min(jnp.where(tie & (rank == need[:, None]), cols, n_y - 1), 1)
  kept = gt + jnp.where(before, eq, 0) + jnp.where(rows == r[:, None], need[:, None], 0)
  plt.store(theta_ref.at[t], _key_to_float(theta), mask=live)
  plt.store(cut_ref.at[t], r * n_y + j, mask=live)
  plt.store(ends_ref.at[t[:, None], rows], jnp.cumsum(kept, axis=1), mask=real)


def _emit_kernel(lx_ref, lys_ref, col_ref, theta_ref, cut_ref, ends_ref, scores_ref, idx_ref,
                 *, k: int, block_t: int, slots: int):
  tokens, n_x = lx_ref.shape
  n_y = lys_ref.shape[1]
  t, live, tc = common.token_block(block_t, tokens)
  t, live, tc = t[:, None], live[:, None], tc[:, None]  # per-token values are (block_t, 1)
  theta = _ordered_key(plt.load(theta_ref.at[tc], mask=live, other=0.0))
  cut = plt.load(cut_ref.at[tc], mask=live, other=0)
  r = lax.div(cut, n_y)

  def start(row, mask):  # first output slot of each row: ends[row - 1], 0 for row 0
    return plt.load(ends_ref.at[tc, jnp.maximum(row - 1, 0)], mask=mask & (row > 0), other=0)

  def store(slot, row, pos, mask):  # the pair (row, sorted position pos) to its slot
    pos = jnp.minimum(pos, n_y - 1)
    ly = plt.load(lys_ref.at[tc, pos], mask=mask, other=0.0)
    col = plt.load(col_ref.at[tc, pos], mask=mask, other=0)
    lx = plt.load(lx_ref.at[tc, jnp.minimum(row, n_x - 1)], mask=mask, other=0.0)
    out = (t, jnp.where(mask, slot, k))
    plt.store(scores_ref.at[out], _sum(lx, ly), mask=mask)
    plt.store(idx_ref.at[out], row * n_y + col, mask=mask)

  # The cut row's kept ties (not a prefix of its sorted list) go to their slots by a cumsum.
  pos = common.iota(common.pow2(n_y))[None, :]
  real = live & (pos < n_y)
  ly = plt.load(lys_ref.at[tc, jnp.minimum(pos, n_y - 1)], mask=real, other=0.0)
  col = plt.load(col_ref.at[tc, jnp.minimum(pos, n_y - 1)], mask=real, other=0)
  key = _ordered_key(plt.load(lx_ref.at[tc, jnp.minimum(r, n_x - 1)], mask=live, other=0.0) + ly)
  keep = real & (key == theta) & (col <= cut - r * n_y)
  keep_count = keep.astype(jnp.int32)
  ties_from = start(r, live) + jnp.sum((real & (key > theta)).astype(jnp.int32), 1,
                                       keepdims=True)
  ties_to = ties_from + jnp.sum(keep_count, 1, keepdims=True)
  slot = ties_from + jnp.cumsum(keep_count, axis=1) - 1
  store(slot, jnp.broadcast_to(r, keep.shape), pos, keep)

  # Every other slot finds its row by binary search over the rows' running totals.
  def fill(step, carry):
    o = common.iota(slots, step * slots)[None, :]
    want = live & (o < k) & ((o < ties_from) | (o >= ties_to))

    def before_o(p, probe):
      ends = plt.load(ends_ref.at[tc, jnp.minimum(p, n_x - 1)], mask=probe, other=0)
      return ends <= o

    row = _search(jnp.zeros(want.shape, jnp.int32), jnp.where(want, n_x, 0), before_o)
    store(o, row, o - start(row, want), want)
    return carry

  lax.fori_loop(0, common.cdiv(k, slots), fill, 0)


def _sort_columns(ly: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each row of ly in descending order (equal values: lower id first), with the ids."""
  ids = lax.broadcasted_iota(jnp.int32, ly.shape, 1)
  keys, ids = lax.sort((~_ordered_key(ly), ids), dimension=1, num_keys=2)
  return _key_to_float(~keys), ids


def _threshold(lx, ly, lys, k: int, config: ThresholdConfig, interpret: bool):
  tokens, n_x = lx.shape
  block_t, num_warps = _threshold_launch(config, n_x)
  kernel = functools.partial(_threshold_kernel, k=k, block_t=block_t)
  return common.triton_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((tokens,), jnp.float32),
                 jax.ShapeDtypeStruct((tokens,), jnp.int32),
                 jax.ShapeDtypeStruct((tokens, n_x), jnp.int32)),
      grid=(common.cdiv(tokens, block_t),), num_warps=num_warps,
      num_stages=config.num_stages, interpret=interpret, name="router_threshold")(lx, ly, lys)


def _emit(lx, lys, cols, theta, cut, ends, k: int, config: ThresholdConfig, interpret: bool):
  tokens = lx.shape[0]
  kernel = functools.partial(_emit_kernel, k=k, block_t=config.emit_block_t,
                             slots=min(config.emit_slots, common.pow2(k)))
  return common.triton_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((tokens, k), jnp.float32),
                 jax.ShapeDtypeStruct((tokens, k), jnp.int32)),
      grid=(common.cdiv(tokens, config.emit_block_t),), num_warps=config.emit_num_warps,
      num_stages=config.num_stages, interpret=interpret,
      name="router_emit")(lx, lys, cols, theta, cut, ends)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
@functools.partial(score_jvp, nondiff_argnums=(2, 3, 4, 5))
def _cartesian_topk(lx, ly, k: int, sort: bool, config: ThresholdConfig, interpret: bool):
  lx, ly = lx.astype(jnp.float32), ly.astype(jnp.float32)
  lys, cols = _sort_columns(ly)
  theta, cut, ends = _threshold(lx, ly, lys, k, config, interpret)
  scores, idx = _emit(lx, lys, cols, theta, cut, ends, k, config, interpret)
  if sort:
    keys, idx = lax.sort((~_ordered_key(scores), idx), dimension=1, num_keys=2)
    scores = _key_to_float(~keys)
  return scores, idx


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _theta_cut(lx, ly, k: int, config: ThresholdConfig, interpret: bool):
  lx, ly = (lax.stop_gradient(a).astype(jnp.float32) for a in (lx, ly))
  theta, cut, _ = _threshold(lx, ly, _sort_columns(ly)[0], k, config, interpret)
  return theta, cut


def _check(lx: jax.Array, ly: jax.Array, k: int, config: ThresholdConfig) -> None:
  if lx.ndim != 2 or ly.ndim != 2 or lx.shape[0] != ly.shape[0]:
    raise ValueError(f"lx and ly must be (T, n_x) and (T, n_y), got {lx.shape} and {ly.shape}")
  ops.check_k(k, lx.shape[1], ly.shape[1])
  for name in ("block_t", "emit_block_t", "emit_slots", "emit_num_warps", "num_warps"):
    value = getattr(config, name)
    if value != common.pow2(value, 1) and not (name in ("block_t", "num_warps") and value == 0):
      raise ValueError(f"ThresholdConfig.{name} must be a power of two, got {value}")


def threshold(lx: jax.Array, ly: jax.Array, k: int, *,
              config: ThresholdConfig = ThresholdConfig(),
              interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """The exact top-k of each token as a membership rule: (theta (T,) f32, cut (T,) int32).

  Expert e = i * n_y + j is among token t's top k iff, with s = fl32(lx[t, i] + ly[t, j]),
  `s > theta[t] or (s == theta[t] and e <= cut[t])`. theta is the k-th largest sum. A
  selection: no gradient flows through it. Stage A of `cartesian_topk` on its own, what
  the rule path consumes (`router.select_rule`, `omnimoe.pallas.expert_rule`).
  """
  _check(lx, ly, k, config)
  if lx.shape[0] == 0:
    return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
  return _theta_cut(lx, ly, k, config, common.resolve_interpret(interpret))


def kept(score: jax.Array, ids: jax.Array, bound: jax.Array, cut: jax.Array) -> jax.Array:
  """`threshold`'s rule applied: whether float32 sums `score` at flat expert ids `ids` are
  kept against a token's theta (as its int32 key, `bound` = `_ordered_key(theta)`) and
  cut, broadcast against each other. Plain jnp, so XLA and the grid kernels (Triton and
  Mosaic GPU, `expert_rule`, `rule_gemm`) evaluate the same rule."""
  key = _ordered_key(score)
  return (key > bound) | ((key == bound) & (ids <= cut))


def cartesian_topk(lx: jax.Array, ly: jax.Array, k: int, *, sorted: bool = True,  # noqa: A002
                   config: ThresholdConfig = ThresholdConfig(),
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact Cartesian top-k by threshold search: (scores (T, k) f32, indices (T, k) int32).

  Same contract as `omnimoe.ops.cartesian_topk`. sorted=True: the reference's order
  (score descending, id ascending); sorted=False: the same set in the kernel's order
  (rows ascending; within a row descending ly, equal ly by ascending column).
  """
  _check(lx, ly, k, config)
  if lx.shape[0] == 0:
    return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
  return _cartesian_topk(lx, ly, k, bool(sorted), config, common.resolve_interpret(interpret))
