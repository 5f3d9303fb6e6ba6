"""Product-key router top-k as one fused Pallas (Triton) kernel.

Reference: `omnimoe.reference.cartesian_topk` (same outputs, same tie rule: scores in
descending order, equal scores by ascending flat expert id `i * n_y + j`; per-axis ties
by lower index). Exactness of the product-key search is argued there.

Design. One program owns `block_t` tokens and does all of their work in registers,
with a few (T, width) scratch outputs where a value must move between lanes (Triton has
no register gather):
  1. per-axis top-k of `lx` and `ly`: `min(k, n)` rounds of an arg-max over the row
     (Triton's arg-max breaks ties to the lower index, our per-axis rule), the winner
     knocked out after each round; both axes in one loop where their counts agree and
     both rows fit in registers. Scores are compared as order-preserving int32 keys
     (IEEE bits with the negative half flipped, -0.0 folded into +0.0), so that a
     knocked-out or padded entry (INT_MIN) sorts below every real score, -inf included.
     `axis_topk="bisect"` (`_axis_topk_bisect`) finds the same picks with ~3x fewer
     integer operations per row element (`_select`: a bisection for the count-th best
     key, then a compaction and a rank): the default "auto" takes it from n = 256 on
     (`BISECT_MIN_N`, measured), where the arg-max rounds' arithmetic bounds the kernel.
  2. the k best of the k_x x k_y candidate sums by `_select` too (ties at the k-th sum
     to the lowest flat ids: the tie rule), each written to its rank's output slot.
     Rows that tie at the k-th key cannot close the bisection early: on bf16-rounded
     log-probs (a third of the rows tie) the router is ~1.5x slower at k = 32 than on
     float32 ones (n = 1024: 0.089 against 0.056 ms on one H100), which is one reason
     `ops.gate_logits` keeps the model's logits float32 (kernels_notes.md, v16).
That is O(k n) compare-and-select work per token for the arg-max rounds, or
O(n + k^2) a bisection step, no memory traffic beyond reading the two rows, the scratch
round trips and writing 2k numbers, and no sort (Triton has none).
`merge="staircase"` runs step 2 on the ~k ln k candidates at best-first positions
(i + 1)(j + 1) <= k only (`staircase`: 119 instead of 1024 lanes at k = 32), with a
border check that falls back to the whole grid where a float tie could let a cell
outside them in; the default "auto" takes it from k = 16 on (`STAIRCASE_MIN_K`, measured).
The cells' values and ids are gathered from each axis' picks, which step 1 writes best
first to scratch (read out of registers lane by lane, as before v14, they cost over a
quarter of the router at n = 1024, k = 32).
XLA's `lax.top_k` with k > 16 sorts whole rows (0.56 ms for the two axes at T=4096,
n=1024, k=32, DESIGN.md section 3); the published Triton kernel takes the top-k of all N
sums (59.5 ms at N=2^20). Rows are padded to a power of two (Triton's array sizes) and
masked. Timings: experiments/RESULTS.md (kernel table) and kernels_notes.md (v8b, v12,
v14). Two tokens per program on one warp was the fastest of 7 launch shapes for the grid
merge when it ran k rounds of arg-max (before v14); the staircase runs faster with one.

k above `MAX_KERNEL_K` goes to `router_threshold` (threshold search + bounded emit,
O(n log n + k) per token, for k in the thousands; its launch: `RouterConfig.threshold`);
n above `MAX_KERNEL_N` falls back to the reference. Scores are differentiable: a custom
JVP (`score_jvp`, shared by both kernels) gathers the tangents of lx and ly at the chosen
experts (the kernels only select).

Exactness: as the reference's (see there), including its one caveat: float rounding
that ties a sum from outside the k x k candidate grid with the k-th sum.

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
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plt

from omnimoe import ops, reference
from omnimoe.pallas import common

if TYPE_CHECKING:  # router_threshold imports this module's helpers
  from omnimoe.pallas.router_threshold import ThresholdConfig

# Up to here the fused kernel beats the threshold search. H100, T = 4096, device time
# of host-timed launches, threshold -> fused (staircase merge by selection, v14): k = 64
# n = 1024 0.479 -> 0.183 ms, n = 320 0.177 -> 0.121, n = 256 0.127 -> 0.110; k = 128,
# n = 1024 0.509 against 0.625 (kernels_notes.md, v14). Before v14 (k rounds of arg-max
# in the merge) the threshold search won from k = 48 on (RESULTS.md, "Path crossover").
MAX_KERNEL_K = 64
MAX_KERNEL_N = 16384
_INT_MIN = np.int32(np.iinfo(np.int32).min)
_INT_MAX = np.int32(np.iinfo(np.int32).max)
_SIGN_FLIP = np.int32(0x7FFFFFFF)


MERGES = ("auto", "grid", "staircase")
# Step 1's method: "argmax" (count rounds of an arg-max over the row) or "bisect" (the
# count-th best key by bisection, then the picks compacted and ranked; `_axis_topk_bisect`).
AXIS_TOPKS = ("argmax", "bisect")
# "auto" bisects from this row length on (larger of the two axes). H100, T = 4096, k = 32,
# default launch shapes, arg-max rounds -> bisection: n = 1024 0.125 -> 0.088 ms, n = 256
# 0.058 -> 0.040; at n = 64, k = 16 the two are within the spread of repeated launches
# (0.018-0.025 ms each); n = 128 not measured (kernels_notes.md, v12;
# `bench_kernels.py --parts sweep --sweep router`).
BISECT_MIN_N = 256
# "auto" merges the staircase from this k on, with one token per program; the whole grid
# (two tokens a program) below, where it is not measured. H100, T = 4096, grid ->
# staircase, both merging by selection (v14): k = 16 n = 1024 0.102 -> 0.050 ms, n = 256
# 0.023 -> 0.019, n = 64 0.019 -> 0.018; k = 32 measured in v8b (kernels_notes.md).
STAIRCASE_MIN_K = 16


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  block_t: int = 0      # tokens per program; 0: 1 for the staircase merge, 2 for the grid
  num_warps: int = 0    # 0: one warp per 2048 elements of the larger in-register array
  num_stages: int = 1
  max_kernel_k: int = MAX_KERNEL_K  # larger k: `router_threshold`
  merge: str = "auto"   # step 2's candidates: "grid" (all k_x k_y), "staircase" or "auto"
  threshold: ThresholdConfig | None = None  # `router_threshold`'s launch; None: default
  axis_topk: str = "auto"  # step 1: "argmax", "bisect" (AXIS_TOPKS) or "auto"

  def __post_init__(self):
    if self.merge not in MERGES:
      raise ValueError(f"RouterConfig.merge must be one of {MERGES}, got {self.merge!r}")
    if self.axis_topk not in ("auto", *AXIS_TOPKS):
      raise ValueError(f"RouterConfig.axis_topk must be 'auto' or one of {AXIS_TOPKS}, "
                       f"got {self.axis_topk!r}")
    common.check_pow2("RouterConfig.block_t", self.block_t, auto=True)
    common.check_pow2("RouterConfig.num_warps", self.num_warps, auto=True)

  def resolved(self, k: int, n: int) -> RouterConfig:
    """The config with "auto" and block_t = 0 replaced by what they pick at this k and
    row length n (the larger axis)."""
    merge = self.merge
    if merge == "auto":
      merge = "staircase" if k >= STAIRCASE_MIN_K else "grid"
    axis_topk = self.axis_topk
    if axis_topk == "auto":
      axis_topk = "bisect" if n >= BISECT_MIN_N else "argmax"
    block_t = self.block_t or (1 if merge == "staircase" else 2)
    return dataclasses.replace(self, merge=merge, block_t=block_t, axis_topk=axis_topk)


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


def _row_keys(ref, n: int, rows, row_mask):
  """(cols (1, pow2(n)), keys (block_t, pow2(n))): the int32 keys of ref[rows, :n], INT_MIN
  on the padding lanes (below every real key).

  The column index is clamped even where n is a power of two, unlike `common.lanes`: the
  row then loads one element a thread, and that layout measured faster downstream (the
  vector load made the kernel ~10 % slower at n = 1024; kernels_notes.md, v13). The
  threshold router's row loads are clamped the same way (not timed vectorised).
  """
  cols = common.iota(common.pow2(n))[None, :]
  vals = plt.load(ref.at[rows[:, None], jnp.minimum(cols, n - 1)],  # clamp and mask
                  mask=row_mask[:, None] & (cols < n), other=0.0).astype(jnp.float32)
  return cols, jnp.where(cols < n, _ordered_key(vals), _INT_MIN)


def _picked_values(ref, rows, row_mask, picks, count: int):
  """ref[rows, picks] as float32 (block_t, width), 0 past the `count` picks."""
  got = row_mask[:, None] & (common.iota(picks.shape[1])[None, :] < count)
  return plt.load(ref.at[rows[:, None], picks], mask=got, other=0.0).astype(jnp.float32)


def _axes_topk(axes, rows, row_mask, count: int):
  """For each axis (ref, n, width): the positions of the `count` best entries of each row
  of ref[rows, :n], best first, and their values. The axes share one loop of rounds, so
  their arg-max reductions in a round are independent and overlap."""
  loaded = [(*_row_keys(ref, n, rows, row_mask), common.iota(width)[None, :])
            for ref, n, width in axes]

  def round_(m, carry):
    out = []
    for (cols, _, slots), (keys, picks) in zip(loaded, carry):
      pick = lax.argmax(keys, 1, jnp.int32)[:, None]
      out.append((jnp.where(cols == pick, _INT_MIN, keys), jnp.where(slots == m, pick, picks)))
    return tuple(out)

  init = tuple((keys, jnp.zeros((rows.shape[0], slots.shape[1]), jnp.int32))
               for _, keys, slots in loaded)
  return [(_picked_values(ref, rows, row_mask, picks, count), picks)
          for (ref, _, _), (_, picks) in zip(axes, lax.fori_loop(0, count, round_, init))]


def _kth_key(keys, count: int):
  """theta (block_t, 1): each row's count-th best int32 key (padding: INT_MIN, below every
  real key; each row holds >= count real ones), by bisection.

  theta = max v with #(keys >= v) >= count, on the closed bracket [lo, hi] that starts at
  the row's least and greatest real keys; the ceiling midpoint is computed without int32
  overflow; the loop stops when every row's bracket is closed. A midpoint that exactly
  count keys reach closes the bracket early: the picks are then the keys >= it (`_select`
  takes gt plus all of eq), the same set. For log-softmax rows of random normal logits
  that is after 8 steps on average instead of 23-24 (n = 64..1024; a numpy replay of this
  loop, 200 rows each): the gap between the count-th and the next key is wide in int32
  keys.
  """
  def step(carry):
    lo, hi = carry
    mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)
    reach = jnp.sum((keys >= mid).astype(jnp.int32), axis=1, keepdims=True)
    enough = reach >= count
    return jnp.where(enough, mid, lo), jnp.where(reach == count, mid,
                                                 jnp.where(enough, hi, mid - 1))

  bracket = (jnp.min(jnp.where(keys == _INT_MIN, _INT_MAX, keys), axis=1, keepdims=True),
             jnp.max(keys, axis=1, keepdims=True))
  theta, _ = lax.while_loop(lambda c: jnp.max((c[0] < c[1]).astype(jnp.int32)) > 0, step,
                            bracket)
  return theta


def _lowest_ids(ids, eq, need):
  """eq & (id among the `need` lowest ids of the eq lanes), per row: a bisection for the
  need-th lowest id (ids are distinct and >= 0 within a row)."""
  def step(carry):
    lo, hi = carry
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # the floor midpoint, without overflow
    enough = jnp.sum((eq & (ids <= mid)).astype(jnp.int32), axis=1, keepdims=True) >= need
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  bracket = (jnp.min(jnp.where(eq, ids, _INT_MAX), axis=1, keepdims=True),
             jnp.max(jnp.where(eq, ids, -1), axis=1, keepdims=True))
  phi, _ = lax.while_loop(lambda c: jnp.max((c[0] < c[1]).astype(jnp.int32)) > 0, step,
                          bracket)
  return eq & (ids <= phi)


def _select(keys, ids, count: int, width: int, t, rows, live, scratch, barrier: bool,
            ids_in_lane_order: bool = False):
  """The `count` best (key, id) of each row, ties at the count-th key to the lowest ids.

  Per token: theta, the count-th best key (`_kth_key`); the picks are the keys above it
  and as many of the keys equal to it as are still needed, lowest ids first, found only
  where some row has more ties than it needs (often so for gates computed in bfloat16:
  14 % of the rows at n = 256, 31 % at n = 1024 in the layer benchmark): by a cumsum
  where the ids ascend with the lanes (a row's columns), else by a second bisection
  (`_lowest_ids`; the staircase's cells are in no id order); they are written compacted
  in lane order to `scratch` ((T, width) keys and ids, outputs of the call) and read
  back, `width` >= count lanes a token; each one's rank, its place in
  best-first order (key descending, id ascending), counts the picks better than it (a
  width x width comparison). `barrier` orders the program's scratch stores before its
  loads (a CTA barrier on the GPU; interpret mode runs a program's steps in order and has
  no such primitive). Why no k rounds of arg-max: each round costs a few operations per
  candidate, the bisection a compare and a sum per step, ~8 steps (`_kth_key`).

  Returns (keys, ids, rank, got) (block_t, width) in compacted order, got marking the
  count picks of the live tokens, and theta (block_t, 1).
  """
  theta = _kth_key(keys, count)
  gt, eq = keys > theta, keys == theta
  need = count - jnp.sum(gt.astype(jnp.int32), axis=1, keepdims=True)
  surplus = jnp.max(jnp.sum(eq.astype(jnp.int32), axis=1, keepdims=True) - need)
  if ids_in_lane_order:
    first_ties = lambda: eq & (jnp.cumsum(eq.astype(jnp.int32), axis=1) <= need)
  else:
    first_ties = lambda: _lowest_ids(ids, eq, need)
  ties = lax.cond(surplus > 0, lambda: first_ties().astype(jnp.int32),
                  lambda: eq.astype(jnp.int32))
  picked = gt | (ties > 0)
  slot = jnp.where(picked, jnp.cumsum(picked.astype(jnp.int32), axis=1) - 1, width)
  dest, keep = (t[:, None], slot), live[:, None] & picked
  for ref, val in zip(scratch, (keys, ids)):
    plt.store(ref.at[dest], val, mask=keep)
  if barrier:
    plt.debug_barrier()
  slots = common.iota(width)[None, :]
  got = live[:, None] & (slots < count)
  ckeys, cids = (plt.load(ref.at[rows[:, None], slots], mask=got, other=fill)
                 for ref, fill in zip(scratch, (_INT_MIN, 0)))
  better = ((ckeys[:, None, :] > ckeys[:, :, None])
            | ((ckeys[:, None, :] == ckeys[:, :, None]) & (cids[:, None, :] < cids[:, :, None])))
  rank = jnp.sum(better.astype(jnp.int32), axis=2)
  return (ckeys, cids, rank, got), theta


def _axis_topk_bisect(axis, t, rows, live, count: int, scratch, best, barrier: bool):
  """`_axes_topk` for one axis (the same picks, written best first to `best`: (T, width)
  int32 keys and ids, read back by `_best_lists`) with fewer operations per row element:
  `_select` over the row's keys and column ids (ties: lower index first).

  The arg-max rounds cost ~7 integer operations per row element per round (the arg-max
  reduction and the knock-out), `count` rounds: at n = 1024 the router is bound by this
  arithmetic; the bisection costs ~2 a step, ~8 steps.
  """
  ref, n, width = axis
  cols, keys = _row_keys(ref, n, rows, live)
  (ckeys, cids, rank, got), _ = _select(keys, jnp.broadcast_to(cols, keys.shape), count,
                                        width, t, rows, live, scratch, barrier,
                                        ids_in_lane_order=True)
  for ref, val in zip(best, (ckeys, cids)):
    plt.store(ref.at[t[:, None], rank], val, mask=got)


def _grid_candidates(rv, ri, cv, ci, kx: int, ky: int, n_y: int):
  """All k_x x k_y sums of the two axes' picks: (keys, flat ids), (block_t, w_x w_y)."""
  block_t, wx = rv.shape
  wy = cv.shape[1]
  ok = (common.iota(wx) < kx)[:, None] & (common.iota(wy) < ky)[None, :]
  keys = jnp.where(ok[None], _ordered_key(rv[:, :, None] + cv[:, None, :]), _INT_MIN)
  flat = ri[:, :, None] * n_y + ci[:, None, :]
  return keys.reshape(block_t, wx * wy), flat.reshape(block_t, wx * wy)


def _read_lists(refs, rows, live, pos):
  """refs[r][rows, pos] for each of the (T, width) int32 refs (best-first keys or ids),
  (block_t, L) each for positions pos (L,); 0 (the key of 0.0) where pos < 0: padding."""
  at = (rows[:, None], jnp.maximum(pos, 0)[None, :])
  mask = live[:, None] & (pos >= 0)[None, :]
  return [plt.load(ref.at[at], mask=mask, other=0) for ref in refs]


def _best_lists(best, rows, live, count: int, width: int):
  """The first `count` entries of best-first lists (keys, ids refs) as (values float32,
  ids), (block_t, width) registers, 0 past them (what `_axes_topk` returns)."""
  lanes = common.iota(width)
  keys, ids = _read_lists(best, rows, live, jnp.where(lanes < count, lanes, -1))
  return _key_to_float(keys), ids


def _staircase_candidates(x_best, y_best, rows, live, cells, border, n_y: int):
  """Keys and flat ids of the staircase cells, and the border cells' keys (INT_MIN, below
  every float's key, where a position is -1: padding), gathered from the two axes'
  best-first lists in memory (Triton has no register gather)."""
  def key(pos, row_key, col_key):
    sums = _key_to_float(row_key) + _key_to_float(col_key)
    return jnp.where((pos >= 0)[None, :], _ordered_key(sums), _INT_MIN)

  row_key, row_id = _read_lists(x_best, rows, live, cells[0])
  col_key, col_id = _read_lists(y_best, rows, live, cells[1])
  [border_row], [border_col] = (_read_lists(best[:1], rows, live, pos)
                                for best, pos in ((x_best, border[0]), (y_best, border[1])))
  return (key(cells[0], row_key, col_key), row_id * n_y + col_id,
          key(border[0], border_row, border_col))


@functools.cache
def staircase(kx: int, ky: int, k: int) -> tuple[np.ndarray, ...]:
  """Positions (i, j) in the two best-first pick lists that can hold the top k:
  (i + 1)(j + 1) <= k, about k ln k of the k_x k_y cells; and per row the first cell
  past them, (i, k // (i + 1)), which bounds its row's rest. As (rows, cols, border_rows,
  border_cols), padded with -1 to powers of two.

  Why it is exact (with one check). A cell c = (i, j) outside the staircase is dominated
  (both positions <=) by at least k staircase cells, since sum over a <= i + 1 of
  min(j + 1, k // a) >= k when (i + 1)(j + 1) > k; each has a sum >= c's (the lists are
  sorted and float addition is monotone). So c's key is <= theta, the k-th best key of
  the staircase, and c can only enter the top k by a tie at theta broken by a lower flat
  id. Every such c makes its row's border cell equal theta too, so: no border key equal
  to theta => the staircase's top k is the grid's; else the kernel merges the whole grid.
  """
  cells = [(i, j) for i in range(kx) for j in range(min(ky, k // (i + 1)))]
  border = [(i, k // (i + 1)) for i in range(kx) if k // (i + 1) < ky]

  def padded(pairs):
    out = -np.ones((common.pow2(len(pairs), 1), 2), np.int32)
    out[:len(pairs)] = np.asarray(pairs, np.int32).reshape(-1, 2)
    return out[:, 0].copy(), out[:, 1].copy()

  return padded(cells) + padded(border)


def _lists_per_axis(merge: str, axis_topk: str) -> int:
  """(T, width) int32 scratch outputs the kernel takes per axis: the bisection's compacted
  keys and ids, and the best-first keys and ids the bisection writes and the staircase
  gathers from. The merge takes two more, its own compacted keys and ids."""
  return 2 * (axis_topk == "bisect") + 2 * (axis_topk == "bisect" or merge == "staircase")


def _router_kernel(lx_ref, ly_ref, *refs, k: int, block_t: int, merge: str, share_axes: bool,
                   axis_topk: str, barrier: bool):
  per_axis = _lists_per_axis(merge, axis_topk)
  *stair_refs, scores_ref, idx_ref, merge_keys, merge_ids = refs[:len(refs) - 2 * per_axis]
  x_scratch, y_scratch = refs[len(refs) - 2 * per_axis:][:per_axis], refs[len(refs) - per_axis:]
  tokens, n_x = lx_ref.shape
  n_y = ly_ref.shape[1]
  kx, ky = min(k, n_x), min(k, n_y)
  wx, wy = common.pow2(kx), common.pow2(ky)
  t, live, rows = common.token_block(block_t, tokens)
  x_axis, y_axis = (lx_ref, n_x, wx), (ly_ref, n_y, wy)
  # x_best, y_best: each axis' picks best first, in memory (keys, ids), where the
  # bisection writes them or the staircase gathers from them
  x_best, y_best = x_scratch[-2:], y_scratch[-2:]
  if axis_topk == "bisect":
    _axis_topk_bisect(x_axis, t, rows, live, kx, x_scratch[:2], x_best, barrier)
    _axis_topk_bisect(y_axis, t, rows, live, ky, y_scratch[:2], y_best, barrier)
    picks = lambda: (*_best_lists(x_best, rows, live, kx, wx),
                     *_best_lists(y_best, rows, live, ky, wy))
  else:
    if share_axes:
      (rv, ri), (cv, ci) = _axes_topk([x_axis, y_axis], rows, live, kx)
    else:
      [(rv, ri)], [(cv, ci)] = (_axes_topk([x_axis], rows, live, kx),
                                _axes_topk([y_axis], rows, live, ky))
    picks = lambda: (rv, ri, cv, ci)
    if merge == "staircase":
      for (v, i), best, w, count in (((rv, ri), x_best, wx, kx), ((cv, ci), y_best, wy, ky)):
        slots = common.iota(w)[None, :]
        for ref, val in zip(best, (_ordered_key(v), i)):
          plt.store(ref.at[t[:, None], slots], val, mask=live[:, None] & (slots < count))
  if barrier and per_axis:
    plt.debug_barrier()  # the best-first lists are in memory before any gather

  def whole_grid():
    if barrier:
      plt.debug_barrier()  # a staircase merge's loads of the merge scratch are done
    return _select(*_grid_candidates(*picks(), kx, ky, n_y), k, common.pow2(k), t, rows, live,
                   (merge_keys, merge_ids), barrier)[0]

  if merge == "grid":
    best = whole_grid()
  else:
    cells, border = ([plt.load(r.at[common.iota(r.shape[0])]) for r in pair]
                     for pair in (stair_refs[:2], stair_refs[2:]))
    keys, flat, border_key = _staircase_candidates(x_best, y_best, rows, live, cells, border,
                                                   n_y)
    best, theta = _select(keys, flat, k, common.pow2(k), t, rows, live,
                          (merge_keys, merge_ids), barrier)
    # theta is a real cell's key, so padded border lanes (INT_MIN) never match it.
    tie = jnp.max(((border_key == theta) & live[:, None]).astype(jnp.int32)) > 0
    best = lax.cond(tie, whole_grid, lambda: best)
  best_key, best_idx, rank, got = best
  out = (t[:, None], rank)
  plt.store(scores_ref.at[out], _key_to_float(best_key), mask=got)
  plt.store(idx_ref.at[out], best_idx, mask=got)


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
  stair = () if config.merge == "grid" else tuple(
      jnp.asarray(a) for a in staircase(min(k, lx.shape[1]), min(k, ly.shape[1]), k))
  num_warps = _num_warps(config, max(lx.shape[1], ly.shape[1]), k)
  # The axes' rounds share a loop where their counts agree and both rows, live at once,
  # fit in 32 registers a thread (n <= 512 at the default launch shapes): 4-6 % faster at
  # k = 32 on one H200, equal elsewhere (kernels_notes.md, v8c; n = 1024 not tried shared).
  rows = config.block_t * (common.pow2(lx.shape[1]) + common.pow2(ly.shape[1]))
  share_axes = min(k, lx.shape[1]) == min(k, ly.shape[1]) and rows <= 32 * 32 * num_warps
  kernel = functools.partial(_router_kernel, k=k, block_t=config.block_t, merge=config.merge,
                             share_axes=share_axes, axis_topk=config.axis_topk,
                             barrier=not interpret)
  out_shape = [jax.ShapeDtypeStruct((tokens, k), jnp.float32),
               jax.ShapeDtypeStruct((tokens, k), jnp.int32)]
  # scratch: the merge's compacted picks, then each axis' (`_lists_per_axis`)
  out_shape += [jax.ShapeDtypeStruct((tokens, common.pow2(k)), jnp.int32)] * 2
  for n in (lx.shape[1], ly.shape[1]):
    out_shape += [jax.ShapeDtypeStruct((tokens, common.pow2(min(k, n))), jnp.int32)
                  ] * _lists_per_axis(config.merge, config.axis_topk)
  return tuple(common.triton_call(
      kernel, out_shape=tuple(out_shape), grid=(common.cdiv(tokens, config.block_t),),
      num_warps=num_warps, num_stages=config.num_stages, interpret=interpret,
      name="cartesian_topk")(lx, ly, *stair)[:2])


def cartesian_topk(lx: jax.Array, ly: jax.Array, k: int, *, sorted: bool = True,  # noqa: A002
                   config: RouterConfig = RouterConfig(),
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact product-key top-k: (scores (T, k) f32, indices (T, k) int32).

  Same contract as `omnimoe.ops.cartesian_topk` (which validates inputs; k is checked
  here too, 1 <= k <= n_x n_y). Runs the fused kernel for k <= config.max_kernel_k (always
  in sorted order), `router_threshold` above it (launched with config.threshold;
  sorted=False: its own order, see there), both for n <= MAX_KERNEL_N; the reference
  beyond that.
  """
  ops.check_k(k, lx.shape[1], ly.shape[1])
  if max(lx.shape[1], ly.shape[1]) > MAX_KERNEL_N or lx.shape[0] == 0:
    return reference.cartesian_topk(lx, ly, k)
  if k > config.max_kernel_k:
    from omnimoe.pallas import router_threshold  # it imports this module's helpers
    threshold = config.threshold or router_threshold.ThresholdConfig()
    return router_threshold.cartesian_topk(lx, ly, k, sorted=sorted, config=threshold,
                                           interpret=interpret)
  config = config.resolved(k, max(lx.shape[1], ly.shape[1]))
  return _cartesian_topk(lx, ly, k, config, common.resolve_interpret(interpret))
