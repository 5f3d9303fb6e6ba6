"""Atomic experts in the dense regime, routed by the top-k's membership rule, not pairs.

Reference: `omnimoe.reference.atomic_experts` on the pairs of `reference.cartesian_topk`
with routing weights exp(score) (values), and its autodiff (gradients in x, the tables
and the gates' log-probabilities lx, ly): the same outputs from what the threshold
router knows before it emits any pair, (theta, cut) per token (`router_threshold.threshold`).

Why. In the dense regime (`expert_dense`) the routed branch is the whole (T, N) grid as
GEMMs, and the routing enters only as the grid A of weights. Pairs are a detour there:
the router writes T k of them (16.7 M at the paper's T = k = 4096) and `expert_dense`
scatters them back into a zero-filled grid. Here every grid entry decides its own
membership by the rule that defines the top k,
  e = i n_y + j is routed to t  iff  s > theta_t or (s == theta_t and e <= cut_t),
  s = fl32(lx[t, i] + ly[t, j]),
compared as the routers' order-preserving int32 keys (so exactly the router's set, -0.0
folded into +0.0, whatever the denormal mode), and its weight is exp(s) (routing weights
'exp', the released code's; 'softmax' needs the pairs' path). One elementwise pass over
the grid replaces the emit, the zero fill and the scatter.

Maths, per token block (rows, N), M the rule's mask, W = exp(s):
  forward    S = x U^T;  A = M W act(S);  y = A V
  backward   dA = dy V^T;  G = M W dA;  dS = G act'(S);  dx = dS U;  dU = dS^T x;
             dV = A^T dy;  dlx[t, i] = sum_j G act(S) [t, i n_y + j], dly likewise over i
The grids S, A, dS are written in the inputs' dtype (float32 accumulation inside the
GEMMs, elementwise work in float32). The GEMMs are XLA's (cuBLAS: `expert_dense` says
why). The two grid passes are Pallas kernels, one program per token walking its grid in
tiles (`_over_grid`): the forward's A from S (`_forward_grid_kernel`), and the backward's
dS, dlx, dly (and A where rebuilt) from S and dA in one read of each
(`_grid_grads_kernel`; as XLA fusions the row sums dlx and the column sums dly are
reductions over different axes of one grid, which XLA does not fuse into one pass). The
passes behave as ALU-bound at the headline (tiles of one power-of-two row, 512 lanes for
n_y = 320, ran 1.7x slower), so tiles span a column width that pads n_y least
(`column_width`), W = exp(lx) exp(ly) costs one exp a row and a column rather than one
a lane (within a few float32 ulps of exp(s), as exp(s) is of the exact sum), and the rows
of a column chunk that cannot hold a routed entry (below the top-k's staircase: most of
the grid, `_over_grid`) cost a store of zeros, with no loads and no arithmetic. On one H100
at the headline (T = k = 4096, N = 320^2, bf16, `experiments/bench_rule.py`, RESULTS.md,
kernel times): forward pass 0.62 ms and backward 0.90 with the busy rows ranked in the
kernel (`RuleConfig.row_walk`), against 0.61 and 1.08 plus a 0.08 ms argsort for the
sorted walk in the same call; 0.72 and 1.19 without a walk (an earlier call), 0.89 and
3.57 for the XLA twins (`RuleConfig(grid_pass="xla")`, kept for that A/B, at 22c10cb).
The copy floors of the whole passes (1.7 and 2.5 GB) are ~0.55 and ~0.8 ms. The
forward keeps S (T N elements: the backward needs act'(S) on every routed entry) and, with
one token block, A (`DenseConfig.keep_grid`); token blocks bound the other grids' size as
in `expert_dense`. S is one GEMM for a group of token blocks (all of them, up to 2^31
elements: `_groups`), each block's passes reading its rows at an offset. Second order
(reverse mode): `second_order.by_reference` on `_reference`. The forward alone can take A
from one Mosaic GPU GEMM with the rule in its epilogue instead (`RuleConfig.forward_grid`,
`rule_gemm`): 1.858 ms against S + pass 1.900 at the headline, 1.867 against 1.683 at
k = 1024 (one H100, device time, before its epilogue took ly by TMA; not yet re-timed),
so not the default.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from omnimoe import ops, reference
from omnimoe.pallas import common, rule_gemm, second_order
from omnimoe.pallas.expert_dense import (F32, MAX_GRID_ELEMENTS, DenseConfig, block_rows,
                                          grid_dot)
from omnimoe.pallas.router_threshold import kept
from omnimoe.pallas.router_topk import _ordered_key


def routed_mask(lx: jax.Array, ly: jax.Array, theta: jax.Array, cut: jax.Array) -> jax.Array:
  """(T, N) bool: which experts the rule above routes to each token (XLA)."""
  return _rule_grid(lx, ly, theta, cut)[0]


def _rule_grid(lx, ly, theta, cut):
  """(mask, exp(s)) over a block's (rows, N) grid, float32, from the rule above."""
  s = (lx.astype(F32)[:, :, None] + ly.astype(F32)[:, None, :]).reshape(lx.shape[0], -1)
  ids = lax.broadcasted_iota(jnp.int32, s.shape, 1)
  mask = kept(s, ids, _ordered_key(theta.astype(F32))[:, None], cut[:, None])
  return mask, jnp.exp(s)


def _grid_values(mask, w, s, da, activation: str):
  """The backward's elementwise values at the routed entries, float32: dS = W dA act'(S),
  A = W act(S), and d score = W dA act(S), whose row and column sums are dlx and dly.
  Selected with where, not zeroed by the mask: 0 * inf is NaN."""
  h, dh = common.activation_with_grad(activation, s)
  g = w * da
  return jnp.where(mask, g * dh, 0), jnp.where(mask, w * h, 0), jnp.where(mask, g * h, 0)


def _forward_values(mask, w, s, activation: str):
  """A = W act(S) at the routed entries, float32 (where: 0 * inf is NaN)."""
  return jnp.where(mask, w * reference.ACTIVATIONS[activation](s), 0)


GRID_PASSES = ("kernel", "xla")
ROW_WALKS = ("ranked", "sorted")
FORWARD_GRIDS = ("pass", "gemm")


@dataclasses.dataclass(frozen=True)
class RuleConfig:
  """The dense blocks (`DenseConfig`) and the two grid passes (the forward's A from S; the
  backward's dS, dlx, dly and, where rebuilt, A from S and dA): "kernel" (Pallas,
  `_forward_grid_kernel` and `_grid_grads_kernel`) or "xla" (the same maths as XLA
  fusions); the kernels' launch (grid rows per loop step, warps, software-pipelining
  stages of the loop) and how they find a column chunk's busy rows (`row_walk`,
  `_over_grid`: "ranked" by in-kernel ranks, or "sorted" by an XLA argsort of lx; ranked
  was the faster in 33 of 34 comparisons, T = 1024 to 16,384, k = 512 to 4096: RESULTS.md);
  and the most elements of one S buffer (`max_group_elements`: `_forward` keeps S whole
  for as many token blocks as fit, up to `expert_dense.MAX_GRID_ELEMENTS`). Where the
  forward alone (no backward follows) gets A (`forward_grid`): "pass", S by cuBLAS then
  the forward grid pass; "gemm", one Mosaic GPU kernel with the rule in its epilogue
  (`rule_gemm`, launched by `gemm`; S never stored) where it runs (a Hopper GPU, or
  interpret mode: `rule_gemm.runs_here`) and serves the inputs (`rule_gemm.supported`),
  else "pass"."""
  dense: DenseConfig = DenseConfig()
  grid_pass: str = "kernel"
  block_rows: int = 16
  num_warps: int = 4
  num_stages: int = 1
  row_walk: str = "ranked"
  max_group_elements: int = MAX_GRID_ELEMENTS
  forward_grid: str = "pass"
  gemm: rule_gemm.RuleGemmConfig = rule_gemm.RuleGemmConfig()

  def __post_init__(self):
    if self.forward_grid not in FORWARD_GRIDS:
      raise ValueError(f"RuleConfig.forward_grid must be one of {FORWARD_GRIDS}, got "
                       f"{self.forward_grid!r}")
    if self.grid_pass not in GRID_PASSES:
      raise ValueError(f"RuleConfig.grid_pass must be one of {GRID_PASSES}, got "
                       f"{self.grid_pass!r}")
    if self.row_walk not in ROW_WALKS:
      raise ValueError(f"RuleConfig.row_walk must be one of {ROW_WALKS}, got "
                       f"{self.row_walk!r}")
    common.check_pow2("RuleConfig.block_rows", self.block_rows)
    common.check_pow2("RuleConfig.num_warps", self.num_warps)
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"RuleConfig.num_stages must be an int >= 1, got {self.num_stages!r}")
    if not isinstance(self.max_group_elements, int) or not (
        1 <= self.max_group_elements <= MAX_GRID_ELEMENTS):
      raise ValueError("RuleConfig.max_group_elements must be an int in [1, 2^31), got "
                       f"{self.max_group_elements!r}")


def column_width(n_y: int) -> int:
  """Grid columns a tile spans: the power of two (16 to 128) that pads n_y least (ties:
  the wider). The passes are ALU-bound at the headline, so padded lanes cost their share:
  320 = 5 x 64 has none, where one power-of-two row (512) would waste 37.5 %."""
  return min((128, 64, 32, 16), key=lambda w: (common.cdiv(n_y, w) * w, -w))


class _Tile(NamedTuple):
  """`block_rows` grid rows i x `column_width` columns j of one token: `token`
  (block_rows, 1) for indexing, the column chunk `column`, the flat expert ids (`ids`, for
  stores; `loads`, clamped into the grid), which lanes are `inside` the grid, the rows and
  which are real (`in_rows`; None for either: all, static), the rule's mask (`routed`,
  inside lanes only) and the routing weights exp(lx[i]) exp(ly[j]) (one exp a row and a
  column, not one a lane). An idle tile (no routed entry: `_over_grid`) has neither mask
  nor weights (None)."""
  token: jax.Array
  column: jax.Array
  ids: jax.Array
  loads: jax.Array
  inside: jax.Array
  rows: jax.Array
  in_rows: jax.Array
  routed: jax.Array | None
  weight: jax.Array | None


def row_order(lx: jax.Array) -> jax.Array:
  """(T, n_x) int32: each token's grid rows by descending lx (the "sorted" walk)."""
  return jnp.argsort(lx, axis=1, descending=True).astype(jnp.int32)


def _over_grid(lx_ref, ly_ref, theta_ref, cut_ref, order_ref, block_rows: int, walk: str,
               barrier: bool, step, idle, init, column_done=lambda column, carry: None):
  """This program's token's grid, column chunk by column chunk (`column_width`), each
  `block_rows` rows a step: `carry = step(tile, carry)` from `init` down the chunk's busy
  rows, `idle(tile)` on the rest, then `column_done((raw j, inside or None), carry)`.

  A row is busy in a chunk if it can hold a routed entry there: iff
  key(fl32(lx[i] + max_j ly[j])) >= the bound, since fl32 addition is monotone. The rows
  below the top-k's staircase (55 % of the (row, chunk) pairs at the headline, 88 % at
  k = 512) so cost a store of zeros, with no loads of S or dA and no arithmetic. The walk
  (`RuleConfig.row_walk`) takes the busy rows first, reading the row ids from `order_ref`:
    "ranked": the busy rows' ranks, from a cumsum, place the row ids in `order_ref` (a
      (T, pow2(n_x)) int32 scratch output), per chunk (`barrier`: a CTA barrier on each
      side of the store, on the GPU; interpret mode runs a program's steps in order);
    "sorted": `row_order` (an input): busy rows come first, since busyness is monotone in
      lx; the walk runs up to the last busy place (a bound that holds for any order).
  Where the tiles pad no row or no column (static), that mask is None: unmasked loads and
  stores, no compare a lane."""
  n_x, n_y = lx_ref.shape[1], ly_ref.shape[1]
  width = column_width(n_y)
  blocks = common.cdiv(n_x, block_rows)
  t = pl.program_id(0)
  one = jnp.full((1,), t, jnp.int32)
  bound = _ordered_key(plt.load(theta_ref.at[one]).astype(F32))[:, None]
  cut = plt.load(cut_ref.at[one])[:, None]
  token = jnp.full((block_rows, 1), t, jnp.int32)
  place, place_load, real = common.lanes(common.pow2(n_x), n_x)
  place_token = jnp.full_like(place, t)
  rows_at = place_load if walk == "ranked" else plt.load(order_ref.at[place_token, place_load])
  lx_at = _masked_load(lx_ref.at[place_token, rows_at], None)

  def busy_rows(busy):
    """How many places the walk must take in full: the rest are idle."""
    if walk == "sorted":
      return jnp.max(jnp.where(busy, place + 1, 0))
    idle_rows = real & ~busy
    count = jnp.sum(busy.astype(jnp.int32))
    rank = jnp.where(busy, jnp.cumsum(busy.astype(jnp.int32)) - 1,
                     count + jnp.cumsum(idle_rows.astype(jnp.int32)) - 1)
    rank = jnp.where(real, rank, place)  # padding lanes keep their own slots
    if barrier:
      plt.debug_barrier()  # the previous chunk's reads of the order are done
    plt.store(order_ref.at[place_token, rank], place)
    if barrier:
      plt.debug_barrier()
    return count

  def column(c, unused):
    j, cols, in_cols = common.lanes(width, n_y, c)
    in_cols = None if n_y % width == 0 else in_cols
    ly = _masked_load(ly_ref.at[jnp.full_like(cols, t), cols], in_cols)[None, :]
    top = jnp.max(ly if in_cols is None else jnp.where(in_cols[None, :], ly, -jnp.inf))
    busy_blocks = common.cdiv(
        busy_rows((_ordered_key(lx_at + top) >= bound[0]) & real), block_rows)

    def tile_at(b, with_rule: bool):
      where, where_load, in_rows = common.lanes(block_rows, n_x, b)
      in_rows = None if n_x % block_rows == 0 else in_rows
      i = plt.load(order_ref.at[token[:, 0], where_load])
      rows = i if in_rows is None else jnp.where(in_rows, i, where)
      ids = i[:, None] * n_y + j[None, :]
      inside = _both(None if in_rows is None else in_rows[:, None],
                     None if in_cols is None else in_cols[None, :], ids.shape)
      if inside is not None:
        # padded lanes aim past the grid, not at a real entry: interpret mode's masked
        # stores write them too (the old value, racing the real lane's new one)
        ids = jnp.where(inside, ids, n_x * n_y)
      routed = weight = None
      if with_rule:
        lx = _masked_load(lx_ref.at[token[:, 0], i], in_rows)[:, None]
        routed = _both(inside, kept(lx + ly, ids, bound, cut), ids.shape)
        weight = jnp.exp(lx) * jnp.exp(ly)
      return _Tile(token, c, ids, i[:, None] * n_y + cols[None, :], inside, rows, in_rows,
                   routed, weight)

    def idle_step(b, unused):
      idle(tile_at(b, False))
      return unused

    carry = lax.fori_loop(0, busy_blocks, lambda b, carry: step(tile_at(b, True), carry),
                          init)
    lax.fori_loop(busy_blocks, blocks, idle_step, ())
    column_done((j, in_cols), carry)
    return unused

  lax.fori_loop(0, common.cdiv(n_y, width), column, ())


def _both(a, b, shape):
  """a & b broadcast to `shape`, either None (no mask)."""
  if a is None or b is None:
    return None if a is None and b is None else jnp.broadcast_to(b if a is None else a, shape)
  return a & b


def _masked_load(ref, mask):
  """float32 load, lanes outside `mask` (None: none) read as 0."""
  if mask is None:
    return plt.load(ref).astype(F32)
  return plt.load(ref, mask=mask, other=0.0).astype(F32)


def _load(ref, tile: _Tile, first=None):
  """The tile's entries of a grid; `first` (1,): the grid row of the block's first token
  (S, kept whole for a group of blocks: `_forward`), else the block's own grid."""
  return _masked_load(ref.at[tile.token if first is None else tile.token + first,
                             tile.loads], tile.inside)


def _first_row(first_ref):
  return plt.load(first_ref.at[jnp.zeros((1,), jnp.int32)])


def _store(ref, tile: _Tile, value):
  plt.store(ref.at[tile.token, tile.ids], value.astype(ref.dtype), mask=tile.inside)


def _zeros(tile: _Tile):
  return jnp.zeros(tile.ids.shape, F32)


def _forward_grid_kernel(s_ref, lx_ref, ly_ref, theta_ref, cut_ref, first_ref, a_ref, *,
                         order_ref, activation: str, block_rows: int, walk: str,
                         barrier: bool):
  """A = M W act(S) of one token, S read once (from row `first_ref` on) where a row can
  hold a routed entry and A zero elsewhere (`_over_grid`)."""
  first = _first_row(first_ref)

  def step(tile, carry):
    _store(a_ref, tile, _forward_values(tile.routed, tile.weight, _load(s_ref, tile, first),
                                        activation))
    return carry

  _over_grid(lx_ref, ly_ref, theta_ref, cut_ref, order_ref, block_rows, walk, barrier, step,
             lambda tile: _store(a_ref, tile, _zeros(tile)), ())


def _grid_grads_kernel(s_ref, da_ref, lx_ref, ly_ref, theta_ref, cut_ref, first_ref, ds_ref,
                       dlx_ref, dly_ref, *a_ref, order_ref, activation: str, block_rows: int,
                       walk: str, barrier: bool):
  """dS, dly, dlx per column chunk (summed outside) and A where asked, of one token in one
  pass over its S and dA (`_over_grid`; zeros where a row holds no routed entry): a tile's
  row sums are its chunk's part of dlx; dly sums a chunk's tiles elementwise in registers
  and across rows once, at the chunk's end (a reduction across rows each step would cost
  the warps a shared-memory exchange)."""
  n_x = lx_ref.shape[1]
  t = pl.program_id(0)
  first = _first_row(first_ref)

  def store(tile, ds, a, dlx):
    _store(ds_ref, tile, ds)
    if a_ref:
      _store(a_ref[0], tile, a)
    plt.store(dlx_ref.at[tile.token[:, 0], tile.column * n_x + tile.rows], dlx,
              mask=tile.in_rows)

  def step(tile, dly):
    ds, a, dscore = _grid_values(tile.routed, tile.weight, _load(s_ref, tile, first),
                                 _load(da_ref, tile), activation)
    store(tile, ds, a, jnp.sum(dscore, axis=1))
    return dly + dscore

  def idle(tile):
    store(tile, _zeros(tile), _zeros(tile), jnp.zeros(tile.rows.shape, F32))

  def column_done(column, dly):
    j, in_cols = column
    plt.store(dly_ref.at[jnp.full_like(j, t), j], jnp.sum(dly, axis=0), mask=in_cols)

  width = column_width(ly_ref.shape[1])
  _over_grid(lx_ref, ly_ref, theta_ref, cut_ref, order_ref, block_rows, walk, barrier, step,
             idle, jnp.zeros((block_rows, width), F32), column_done)


def _launch(kernel, out_shape, lx, plan: _Plan, name: str):
  """The kernel over lx's tokens, given the walk's `order_ref` (`_over_grid`): `row_order`
  as a last input ("sorted"), or an int32 scratch as a last output, dropped ("ranked")."""
  walk = plan.config.row_walk
  ranked = walk == "ranked"
  scratch = [jax.ShapeDtypeStruct((lx.shape[0], common.pow2(lx.shape[1])), jnp.int32)]

  def body(*refs):
    at = len(refs) - 1 if ranked else len(refs) - len(out_shape) - 1
    kernel(*refs[:at], *refs[at + 1:], order_ref=refs[at], activation=plan.activation,
           block_rows=plan.config.block_rows, walk=walk, barrier=not plan.interpret)

  call = common.triton_call(
      body, out_shape=[*out_shape, *(scratch if ranked else [])], grid=(lx.shape[0],),
      num_warps=plan.config.num_warps, num_stages=plan.config.num_stages,
      interpret=plan.interpret, name=name)
  return lambda *args: call(*args, *([] if ranked else [row_order(lx)]))[:len(out_shape)]


def _block_of(s, first, tokens: int):
  """The XLA twins' view of one block's rows of S (a slice XLA fuses into its reader)."""
  return lax.dynamic_slice_in_dim(s, first, tokens).astype(F32)


def _forward_grid(s, first, lx, ly, theta, cut, plan: _Plan):
  """A (rows, N) in s.dtype of the token block whose S starts at row `first` of s."""
  if plan.config.grid_pass == "xla":
    return _forward_values(*_rule_grid(lx, ly, theta, cut), _block_of(s, first, lx.shape[0]),
                           plan.activation).astype(s.dtype)
  grid = jax.ShapeDtypeStruct((lx.shape[0], s.shape[1]), s.dtype)
  return _launch(_forward_grid_kernel, [grid], lx, plan, "atomic_experts_rule_forward_grid")(
      s, lx, ly, theta, cut, jnp.reshape(first, (1,)))[0]


def _grid_grads(s, first, da, lx, ly, theta, cut, plan: _Plan, with_a: bool):
  """(dS, A or None) in s.dtype, (dlx, dly) float32 of the token block whose S starts at
  row `first` of s and whose dA is `da`."""
  if plan.config.grid_pass == "xla":
    ds, a, dscore = _grid_values(*_rule_grid(lx, ly, theta, cut),
                                 _block_of(s, first, lx.shape[0]), da.astype(F32),
                                 plan.activation)
    dscore = dscore.reshape(da.shape[0], lx.shape[1], ly.shape[1])
    return ((ds.astype(s.dtype), a.astype(s.dtype) if with_a else None),
            (dscore.sum(2), dscore.sum(1)))
  tokens, n_x = lx.shape
  chunks = common.cdiv(ly.shape[1], column_width(ly.shape[1]))
  grid = jax.ShapeDtypeStruct(da.shape, s.dtype)
  out = _launch(_grid_grads_kernel,
                [grid, jax.ShapeDtypeStruct((tokens, chunks * n_x), F32),
                 jax.ShapeDtypeStruct(ly.shape, F32), *([grid] if with_a else [])], lx, plan,
                "atomic_experts_rule_grid_grads")(s, da, lx, ly, theta, cut,
                                                  jnp.reshape(first, (1,)))
  dlx = out[1].reshape(tokens, chunks, n_x).sum(1)
  return (out[0], out[3] if with_a else None), (dlx, out[2])


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static choices of one call: activation, tokens per block, whether the forward's
  grid A is kept (one block), the grid passes and their launch, interpret mode."""
  activation: str
  rows: int
  keep: bool
  config: RuleConfig
  interpret: bool


def _blocks(rows: int, *arrays):
  """Each array's token blocks (blocks, rows, ...), the last one zero-padded."""
  return [reference.token_blocks(a, rows, 0) for a in arrays]


def _groups(plan: _Plan, num_experts: int, *arrays):
  """The arrays' token blocks (`_blocks`) in groups of as many blocks as keep their S
  grids within `max_group_elements`: per group, the blocks' first rows in the group's S
  (blocks,) int32 and each array's blocks."""
  blocked = _blocks(plan.rows, *arrays)
  count = blocked[0].shape[0]
  size = max(1, plan.config.max_group_elements // (plan.rows * num_experts))
  return [(jnp.arange(min(size, count - g), dtype=jnp.int32) * plan.rows,
           [a[g:g + size] for a in blocked]) for g in range(0, count, size)]


def _joined(groups):
  """Per-group stacks of blocks, as one stack."""
  return groups[0] if len(groups) == 1 else jnp.concatenate(groups)


def _forward_block(s, first, down, lx, ly, theta, cut, plan: _Plan, dtype):
  """y in `dtype` and A of the token block whose S starts at row `first` of s."""
  a = _forward_grid(s, first, lx, ly, theta, cut, plan)
  return common.dot(a, down.astype(s.dtype)).astype(dtype), a


def _forward(x, up, down, lx, ly, theta, cut, plan: _Plan, residuals: bool):
  """y and, with `residuals`, S (a tuple: one grid (blocks x rows, N) per group of token
  blocks, `_groups`) and, with `plan.keep` (one block), the A grid. A group's S is one
  GEMM, and each block's grid pass reads its rows at an offset: a `lax.map` that made S
  block by block stacked it by a copy into a zero-filled buffer (6.7 ms of the FFN's
  42.3 ms fwd+bwd at T = 16,384, k = 4096 on one H100; RESULTS.md). Without residuals
  (the forward alone) each block makes its own S, which dies with the block."""
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  table = up.T.astype(cdt)
  if not residuals:
    fused = (plan.config.forward_grid == "gemm" and rule_gemm.runs_here(plan.interpret) and
             rule_gemm.supported(cdt, cdt, x.shape[1], ly.shape[1], plan.activation,
                                 plan.config.gemm))

    def block(b):
      if fused:
        a = rule_gemm.rule_gemm(b[0].astype(cdt), up.astype(cdt), *b[1:],
                                activation=plan.activation, config=plan.config.gemm,
                                interpret=plan.interpret)
        return common.dot(a, down.astype(cdt)).astype(x.dtype)
      s = grid_dot(b[0].astype(cdt), table, cdt)
      return _forward_block(s, jnp.int32(0), down, *b[1:], plan, x.dtype)[0]

    y = lax.map(block, _blocks(plan.rows, x, lx, ly, theta, cut))
    return reference.unblock_tokens(y, x.shape[0]), None, None
  ys, ss, a = [], [], None
  for firsts, (xg, *rule) in _groups(plan, up.shape[0], x, lx, ly, theta, cut):
    s = grid_dot(xg.reshape(-1, xg.shape[-1]).astype(cdt), table, cdt)
    if plan.keep:
      y, a = _forward_block(s, firsts[0], down, *(r[0] for r in rule), plan, x.dtype)
      y = y[None]
    else:
      y = lax.map(lambda b, s=s: _forward_block(s, b[0], down, *b[1:], plan, x.dtype)[0],
                  (firsts, *rule))
    ys.append(y)
    ss.append(s)
  return reference.unblock_tokens(_joined(ys), x.shape[0]), tuple(ss), a


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _rule_op(x, up, down, lx, ly, theta, cut, plan):
  return _forward(x, up, down, lx, ly, theta, cut, plan, residuals=False)[0]


def _fwd(x, up, down, lx, ly, theta, cut, plan):
  y, s, a = _forward(x, up, down, lx, ly, theta, cut, plan, residuals=True)
  return y, (x, up, down, lx, ly, theta, cut, s, a)


def _backward_block(b, first, s, up, down, plan: _Plan, cdt, a=None):
  """One token block, its S from row `first` of s: (dS, A) grids, and (dx, dlx, dly); A is
  rebuilt unless given."""
  xb, lxb, lyb, thetab, cutb, dyb = b
  da = grid_dot(dyb.astype(cdt), down.T.astype(cdt), cdt)
  (ds, rebuilt), (dlx, dly) = _grid_grads(s, first, da, lxb, lyb, thetab, cutb, plan,
                                          a is None)
  return (ds, rebuilt if a is None else a), (common.dot(ds, up.astype(cdt)), dlx, dly)


def _bwd(plan: _Plan, residuals, dy):
  x, up, down, lx, ly, theta, cut, s, kept_a = residuals
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  if plan.keep:
    (ds, a), per_token = _backward_block((x, lx, ly, theta, cut, dy), jnp.int32(0), s[0], up,
                                         down, plan, cdt, kept_a)
    dup = grid_dot(ds.T, x.astype(cdt), up.dtype)
    ddown = grid_dot(a.T, dy.astype(cdt), down.dtype)
  else:
    def block(grads, b, s):
      first, *b = b
      (ds, a), per_token = _backward_block(b, first, s, up, down, plan, cdt)
      dup, ddown = grads
      return (dup + common.dot(ds.T, b[0].astype(cdt)),
              ddown + common.dot(a.T, b[5].astype(cdt))), per_token

    grads, per_group = (jnp.zeros(up.shape, F32),) * 2, []
    for (firsts, blocks), s_group in zip(
        _groups(plan, up.shape[0], x, lx, ly, theta, cut, dy), s):
      grads, per_token = lax.scan(functools.partial(block, s=s_group), grads,
                                  (firsts, *blocks))
      per_group.append(per_token)
    dup, ddown = grads
    per_token = [reference.unblock_tokens(_joined(p), x.shape[0]) for p in zip(*per_group)]
  dx, dlx, dly = per_token
  return (dx.astype(x.dtype), dup.astype(up.dtype), ddown.astype(down.dtype),
          dlx.astype(lx.dtype), dly.astype(ly.dtype), None, None)


_rule_op.defvjp(_fwd, _bwd)


def atomic_experts_rule(x: jax.Array, up: jax.Array, down: jax.Array, lx: jax.Array,
                        ly: jax.Array, theta: jax.Array, cut: jax.Array, *,
                        activation: str = "silu", config: RuleConfig = RuleConfig(),
                        interpret: bool | None = None) -> jax.Array:
  """`y_t = sum over e routed to t of exp(s_te) act(<x_t, up[e]>) down[e]`, (T, d) in
  x.dtype, the routing given by the rule above: lx (T, n_x), ly (T, n_y) the gates'
  log-probabilities (N = n_x n_y), theta (T,) float32 and cut (T,) int32 from
  `router_threshold.threshold(lx, ly, k)`. Equal to `expert_dense.atomic_experts_dense` on
  the pairs of `cartesian_topk(lx, ly, k)` with weights exp(scores). Differentiable in x,
  up, down, lx and ly (theta and cut are a selection: no gradient), in reverse mode to
  second order: the kernels give the first order, `_reference`'s autodiff the second.
  `interpret`: the grid kernels in Pallas interpret mode (None: unless on a GPU).
  """
  for name, a, rank, meaning in (("x", x, 2, "T, d"), ("up", up, 2, "N, d"),
                                 ("down", down, 2, "N, d"), ("lx", lx, 2, "T, n_x"),
                                 ("ly", ly, 2, "T, n_y"), ("theta", theta, 1, "T"),
                                 ("cut", cut, 1, "T")):
    ops.check_rank(name, a, rank, meaning)
  tokens, n_x = lx.shape
  if ly.shape[0] != tokens or x.shape[0] != tokens or theta.shape != (tokens,) or (
      cut.shape != (tokens,)):
    raise ValueError(f"x, lx, ly, theta, cut must agree on T: {x.shape}, {lx.shape}, "
                     f"{ly.shape}, {theta.shape}, {cut.shape}")
  if up.shape != down.shape or up.shape[0] != n_x * ly.shape[1] or up.shape[1] != x.shape[1]:
    raise ValueError(f"up and down must be (n_x n_y, d) = ({n_x * ly.shape[1]}, "
                     f"{x.shape[1]}), got {up.shape} and {down.shape}")
  if activation not in reference.ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(reference.ACTIVATIONS)}, got "
                     f"{activation!r}")
  if tokens == 0:
    return jnp.zeros(x.shape, x.dtype)
  rows = block_rows(tokens, up.shape[0], config.dense)
  if config.grid_pass == "kernel" and rows * up.shape[0] >= 2 ** 31:
    raise ValueError(f"a token block's grid of {rows} x {up.shape[0]} elements passes the "
                     "grid kernel's int32 offsets: lower DenseConfig.max_block_elements "
                     "below 2^31")
  plan = _Plan(activation, rows, config.dense.keep_grid and rows == tokens, config,
               common.resolve_interpret(interpret))
  op = second_order.by_reference(lambda *a: _rule_op(*a, plan),
                                 lambda *a: _reference(*a, activation), num_diff=5)
  return op(x, up, down, lx, ly, theta, cut.astype(jnp.int32))


def _reference(x, up, down, lx, ly, theta, cut, activation: str):
  """The op as plain XLA in float32, differentiable by autodiff: what its second order
  differentiates (`second_order.by_reference`). The rule's mask is a selection (no
  gradient); the weights exp(lx[i] + ly[j]) carry the gates' gradients."""
  mask, w = _rule_grid(lx, ly, theta, cut)
  s = jnp.dot(x.astype(F32), up.T.astype(F32), precision=lax.Precision.HIGHEST)
  a = _forward_values(mask, w, s, activation)
  return jnp.dot(a, down.astype(F32), precision=lax.Precision.HIGHEST).astype(x.dtype)
