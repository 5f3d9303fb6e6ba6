"""Atomic experts for k in the thousands: expert lines x token tiles on tensor cores.

Reference: `omnimoe.reference.atomic_experts` (values) and its autodiff (gradients).
Selected by `ExpertConfig(path="lines")` only: measured on one H200 at the headline
shapes (T = 4096, k = 4096, N = 102,400, d = 1024, bf16, router ids) this op takes
19.5 ms forward and 49.3 ms forward+backward, several times the whole grid as XLA
GEMMs (`expert_dense`, whose docstring has its figures; `expert_ops.choose_path` picks
it instead); the incidence build alone takes 1.7 ms. On one H100 with the row gathers as
16-byte loads (kernels_notes.md, v13): forward 15.0 ms against `expert_dense`'s 3.06.
The estimates below are what the design aimed at; closing the gap (row gathers by
pointer arrays rather than TMA, 64 x 64 tiles, atomics) is open work.

Why (DESIGN.md sections 2 and 3b). The token-centric kernels gather two table rows per
pair: at the paper's headline setting (T = 4096, d = 1024, N = 102,400 = 320 x 320,
k = 4096) that is 16.7 M pairs, ~68 GB of row gathers, ~25 ms. But there each expert is
used by ~164 tokens, so the work is better done as dense tiles on tensor cores: group the
experts into *lines* of L consecutive ids (L = n: a grid row), and for every line the
tokens that route into it (the *incidences*, built by `lines.incidences` in XLA, O(T k)).
One program takes a chunk of `block_t` tokens of one line:
  S = X U_line^T           (block_t x L; X the gathered token rows, U_line contiguous rows)
  A = W * act(S)           (W the dense weights of the chunk's incidences, zero where a
                            token has no pair: masking in registers)
  y[tokens] += A V_line    (float32 atomics into a (T, d) buffer, one flush per d tile
                            after the whole line's A @ V is summed in registers)
L is processed as ceil(L / block_e) expert tiles (320 = 5 x 64: no padding to 512); by
default the forward scores all tiles of the line in one pass over d, so each gathered X
tile is loaded once (`tiles_per_pass` trades that against registers: 5 float32 64 x 64
accumulators are 80 registers a thread at 8 warps). A chunk's tokens are distinct, so
no atomic call carries a duplicate address; dead lanes add their zeros into spare rows
past T (no masks on atomics: Pallas' interpreter rejects them). Triton, not Mosaic GPU:
the X tiles are row gathers by token list (DESIGN.md section 7).

Why not other shapes. Dense masking (S over all N) does T N d 4 flops whatever the
routing. A flash-attention-shaped kernel (a token tile owning y while it sweeps the
experts) would need a block_t x d float32 accumulator: d = 1024 does not fit in
registers, and splitting d recomputes S per d tile. Storing A (I x L) and reducing per
token needs a gather of different lines per token (no tensor cores). So y takes atomics:
exactly one float32 add per incidence and column (the line's tiles are summed in
registers first), into a (T, d) buffer that stays in L2.

Costs at the headline shapes (bf16, L = 320, 320 lines; estimates, to be measured).
Router-drawn ids (top-k of lx + ly, unit-variance logits) touch 91 / 127 / 210 of the
320 rows per token at k = 512 / 1024 / 4096, so there are I = T x that = 0.37 / 0.52 /
0.86 M incidences and the line tiles are 1.8 / 2.5 / 6 % dense (uniform ids touch
256 / 307 / 320 rows: I = 1.05 / 1.26 / 1.31 M, tiles 2 / 3 / 4 % dense):
  tensor-core flops   4 I L d = 0.49 / 0.68 / 1.13 TFLOP (router ids; uniform 1.37 /
                      1.65 / 1.72); dense masking over all N: 1.72 TFLOP at every k
  L2 -> SM traffic    2 B d (1 + 2 L / block_t) per incidence (X once, U and V tiles once
                      per chunk) = 22.5 KB at block_t = 64: 8.4 / 11.7 / 19.4 GB; at
                      ~6 TB/s this, not the tensor cores, sets the pace (block_t = 128:
                      12.5 KB, if the registers allow)
  y atomics           I d floats = 0.38 / 0.53 / 0.88 G (1.5 / 2.1 / 3.5 GB into L2);
                      one atomic per 4 L = 1280 flops
  incidence glue      O(T k) scatters/gathers + W: I L 4 B zeroed and read (0.48 / 0.67 /
                      1.1 GB); the allocation is T min(lines, k) L 4 B = 1.7 GB
  backward            5 products of 2 I L d flops (S again, dA, dx; dU, dV), I d atomics
                      for dx, I L (2 + 2 + 2) B of dS, A, dweights written, dS and A read
                      back by the table products (d / block_d + L / block_e reads of
                      each incidence's coefficient and vector tiles)
So with router ids the line tiles do 1.5-3.5x fewer flops than dense masking, and as
many with uniform ids; the L2 traffic and the atomics are what the GPU runs must check
(they did: see the top of this docstring).

Backward (custom VJP, float32 accumulation). S is recomputed, not stored: storing it
would cost I L 4 B (1.1 GB at k = 4096) written in the forward and read back, about the
time of the recompute (0.56 TFLOP), and would make inference pay for training. One
kernel per incidence chunk (same items as the forward) recomputes S and
dA = dY V_line^T (tile by tile by default: both for all five tiles would hold 160
float32 registers a thread), then dS = dA W act'(S), A = W act(S) and
dweights = dA act(S); it stores dS and A (in the product dtype) and dweights (per
incidence, gathered back per pair in XLA; duplicate pairs each get theirs) and adds
dx += dS U_line with atomics. A second kernel,
run twice, makes the table gradients per line without atomics: one program per
(d tile, expert tile, line) loops over the line's token chunks,
  dU_line = dS^T X,  dV_line = A^T dY,
and writes its tile of the (N, d) gradient once, zeros included.

Equivalent JAX code (G the (T, N) routing weights, duplicates summed, invalid ids dropped):
  S = x @ up.T;  A = G * act(S);  y = A @ down
  dA = dy @ down.T;  dS = dA * G * act'(S);  dx = dS @ up;  dup = dS.T @ x;
  ddown = A.T @ dy;  dweights[t, j] = (dA * act(S))[t, indices[t, j]]
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from omnimoe import reference
from omnimoe.pallas import common, lines


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  block_t: int = 64     # tokens per tile (one chunk of a line's incidences)
  block_e: int = 64     # experts per tile (a line is ceil(L / block_e) tiles)
  block_d: int = 64     # hidden-dimension step of the products
  num_warps: int = 4
  num_stages: int = 2
  tiles_per_pass: int = 0  # expert tiles whose scores share one pass over d; 0: all


@dataclasses.dataclass(frozen=True)
class LinesConfig:
  line_size: int = 0    # experts per line; 0: `auto_line_size`
  forward: BlockConfig = BlockConfig(num_warps=8)
  backward: BlockConfig = BlockConfig(num_warps=8, tiles_per_pass=1)  # dx, dw, dS, A
  tables: BlockConfig = BlockConfig(block_d=128)  # dU, dV: block_e x block_d tiles


def auto_line_size(num_experts: int) -> int:
  """A row of the Cartesian grid (n when N = n * n), else 256."""
  n = math.isqrt(num_experts)
  return n if n * n == num_experts else 256


def _check(config: LinesConfig, activation: str) -> None:
  if activation not in reference.ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(reference.ACTIVATIONS)}, got "
                     f"{activation!r}")
  if config.line_size < 0:
    raise ValueError(f"line_size must be >= 0 (0: auto), got {config.line_size}")
  for name in ("forward", "backward", "tables"):
    block = getattr(config, name)
    for field in ("block_t", "block_e", "block_d"):
      v = getattr(block, field)
      if v < 16 or v & (v - 1):
        raise ValueError(f"{name}.{field} must be a power of two >= 16 (a tensor-core "
                         f"operand dimension), got {v}")


# ---------------------------------------------------------------------------- in-kernel


def _chunk(items_ref, inc_token_ref, block_t: int, tokens: int):
  """This program's line, incidence rows, which are live, their tokens (clamped), and
  the spare-row targets of atomics (a dead lane r adds into row tokens + r)."""
  i = pl.program_id(0)
  line, lo, hi = items_ref[0, i], items_ref[1, i], items_ref[2, i]
  rows = common.iota(block_t, lo)
  live = rows < hi
  t = plt.load(inc_token_ref.at[jnp.minimum(rows, inc_token_ref.shape[0] - 1)],
               mask=live, other=0)
  t = jnp.clip(t, 0, tokens - 1)
  spare = jnp.where(live, t, tokens + common.iota(block_t))
  return line, rows, live, t, spare, hi > lo


def _experts(line, j: int, line_size: int, block_e: int, num_experts: int):
  """Expert tile j of the line: positions in the line, ids (clamped), which exist."""
  pos = common.iota(block_e, j * block_e)
  e = line * line_size + pos
  ok = (pos < line_size) & (e < num_experts)
  return pos, jnp.clip(e, 0, num_experts - 1), ok


def _line_tiles(line, line_size: int, block_e: int, num_experts: int):
  """All expert tiles of the line, (pos, e, ok) each."""
  return [_experts(line, j, line_size, block_e, num_experts)
          for j in range(common.cdiv(line_size, block_e))]


def _rows(table_ref, e, ok, cols, in_d, cdt):
  """The (block_e, block_d) tile table[e, cols] in the product dtype, zero where masked."""
  return plt.load(table_ref.at[e[:, None], cols[None, :]], mask=ok[:, None] & in_d[None, :],
                  other=0.0).astype(cdt)


def _passes(num_tiles: int, tiles_per_pass: int) -> list[range]:
  """The expert tiles of a line in groups that share one pass over d."""
  size = tiles_per_pass or num_tiles
  return [range(i, min(i + size, num_tiles)) for i in range(0, num_tiles, size)]


def _scores(vec_ref, table_ref, t, live, tiles, block_d: int, steps, cdt):
  """<vec[t], table[e]> for each expert tile (e, ok) of `tiles`, (block_t, block_e)
  float32 each, on tensor cores, in one pass over d (the vec tile is loaded once)."""
  d = vec_ref.shape[1]

  def step(c, accs):
    _, cols, in_d = common.lanes(block_d, d, c)
    v = plt.load(vec_ref.at[t[:, None], cols[None, :]], mask=live[:, None] & in_d[None, :],
                 other=0.0).astype(cdt)
    return tuple(acc + common.dot(v, _rows(table_ref, e, ok, cols, in_d, cdt).T)
                 for acc, (e, ok) in zip(accs, tiles))

  zeros = tuple(jnp.zeros((t.shape[0], e.shape[0]), jnp.float32) for e, _ in tiles)
  return lax.fori_loop(0, steps, step, zeros)


def _combine_atomic(coefs, tiles, table_ref, out_ref, spare, block_d: int, steps, cdt):
  """out[spare] += sum_j coefs[j] @ table[tile j] for every d tile, float32 atomics.

  out_ref is (T + block_t, ceil(d / block_d) * block_d): spare rows and columns take the
  dead lanes, so no atomic needs a mask and none carries a duplicate address.
  """
  d = table_ref.shape[1]

  def step(c, carry):
    raw, cols, in_d = common.lanes(block_d, d, c)
    acc = jnp.zeros((spare.shape[0], block_d), jnp.float32)
    for coef, (e, ok) in zip(coefs, tiles):
      acc = acc + common.dot(coef, _rows(table_ref, e, ok, cols, in_d, cdt))
    plt.atomic_add(out_ref, (spare[:, None], raw[None, :]), acc)
    return carry

  lax.fori_loop(0, steps, step, 0)


def _incidence_weights(w_ref, rows, live, pos, ok):
  """W of the tile, (block_t, block_e) float32, zero where masked."""
  return plt.load(w_ref.at[jnp.minimum(rows, w_ref.shape[0] - 1)[:, None],
                           jnp.minimum(pos, w_ref.shape[1] - 1)[None, :]],
                  mask=live[:, None] & ok[None, :], other=0.0)


def _where_routed(w, value):
  """`value` where the tile's weight is nonzero, else 0: an expert of the line that the
  token does not route to contributes nothing, even where its score overflowed (0 * inf)."""
  return jnp.where(w != 0, value, 0.0)


def _forward_kernel(items_ref, inc_token_ref, w_ref, x_ref, up_ref, down_ref, y_in_ref,
                    y_ref, *, activation: str, line_size: int, config: BlockConfig):
  del y_in_ref  # aliased with y_ref
  tokens, d = x_ref.shape
  line, rows, live, t, spare, any_live = _chunk(items_ref, inc_token_ref, config.block_t,
                                                tokens)
  steps = jnp.where(any_live, jnp.int32(common.cdiv(d, config.block_d)), jnp.int32(0))
  cdt = common.mma_dtype(x_ref.dtype, up_ref.dtype, down_ref.dtype)
  tiles = _line_tiles(line, line_size, config.block_e, up_ref.shape[0])
  coefs = []
  for group in _passes(len(tiles), config.tiles_per_pass):
    scores = _scores(x_ref, up_ref, t, live, [tiles[j][1:] for j in group], config.block_d,
                     steps, cdt)
    for j, s in zip(group, scores):
      pos, _, ok = tiles[j]
      act, _ = common.activation_with_grad(activation, s)
      w = _incidence_weights(w_ref, rows, live, pos, ok)
      coefs.append(_where_routed(w, w * act).astype(cdt))
  _combine_atomic(coefs, [tile[1:] for tile in tiles], down_ref, y_ref, spare,
                  config.block_d, steps, cdt)


def _backward_kernel(items_ref, inc_token_ref, w_ref, x_ref, dy_ref, up_ref, down_ref,
                     dx_in_ref, dx_ref, ds_ref, a_ref, dw_ref, *, activation: str,
                     line_size: int, config: BlockConfig):
  del dx_in_ref  # aliased with dx_ref
  tokens, d = x_ref.shape
  line, rows, live, t, spare, any_live = _chunk(items_ref, inc_token_ref, config.block_t,
                                                tokens)
  steps = jnp.where(any_live, jnp.int32(common.cdiv(d, config.block_d)), jnp.int32(0))
  cdt = common.mma_dtype(x_ref.dtype, up_ref.dtype, down_ref.dtype)
  stored = jnp.where(live, rows, ds_ref.shape[0])[:, None]
  tiles = _line_tiles(line, line_size, config.block_e, up_ref.shape[0])
  ds_tiles = []
  for group in _passes(len(tiles), config.tiles_per_pass):
    pass_tiles = [tiles[j][1:] for j in group]
    scores = _scores(x_ref, up_ref, t, live, pass_tiles, config.block_d, steps, cdt)
    grads = _scores(dy_ref, down_ref, t, live, pass_tiles, config.block_d, steps, cdt)
    for j, s, da in zip(group, scores, grads):
      pos, _, ok = tiles[j]
      act, act_grad = common.activation_with_grad(activation, s)
      w = _incidence_weights(w_ref, rows, live, pos, ok)
      ds = _where_routed(w, da * w * act_grad)
      at, mask = (stored, pos[None, :]), live[:, None] & ok[None, :]
      plt.store(ds_ref.at[at], ds.astype(ds_ref.dtype), mask=mask)
      plt.store(a_ref.at[at], _where_routed(w, w * act).astype(a_ref.dtype), mask=mask)
      plt.store(dw_ref.at[at], (da * act).astype(dw_ref.dtype), mask=mask)
      ds_tiles.append(ds.astype(cdt))
  _combine_atomic(ds_tiles, [tile[1:] for tile in tiles], up_ref, dx_ref, spare,
                  config.block_d, steps, cdt)


def _line_product_kernel(line_start_ref, inc_token_ref, coef_ref, vec_ref, out_ref, *,
                         line_size: int, config: BlockConfig):
  """out[tile of line l] = coef[l's incidences, tile]^T @ vec[l's tokens], written once."""
  num_experts, d = out_ref.shape
  c, j, line = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = line_start_ref[line], line_start_ref[line + 1]
  pos, e, ok = _experts(line, j, line_size, config.block_e, num_experts)
  raw, cols, in_d = common.lanes(config.block_d, d, c)
  cdt = common.mma_dtype(coef_ref.dtype, vec_ref.dtype)
  last = coef_ref.shape[0] - 1

  def step(i, acc):
    rows = common.iota(config.block_t, lo + i * config.block_t)
    live = rows < hi
    r = jnp.minimum(rows, last)
    t = plt.load(inc_token_ref.at[r], mask=live, other=0)
    t = jnp.clip(t, 0, vec_ref.shape[0] - 1)
    coef = plt.load(coef_ref.at[r[:, None], jnp.minimum(pos, line_size - 1)[None, :]],
                    mask=live[:, None] & ok[None, :], other=0.0).astype(cdt)
    vec = plt.load(vec_ref.at[t[:, None], cols[None, :]],
                   mask=live[:, None] & in_d[None, :], other=0.0).astype(cdt)
    return acc + common.dot(coef.T, vec)

  acc = lax.fori_loop(0, (hi - lo + config.block_t - 1) // config.block_t, step,
                      jnp.zeros((config.block_e, config.block_d), jnp.float32))
  plt.store(out_ref.at[jnp.where(ok, e, num_experts)[:, None], raw[None, :]],
            acc.astype(out_ref.dtype), mask=ok[:, None] & in_d[None, :])


# ---------------------------------------------------------------------------- stages


def _atomic_buffer(tokens: int, d: int, config: BlockConfig):
  """Zeros (T + block_t, d padded to block_d) float32: the target of the atomics."""
  width = common.cdiv(d, config.block_d) * config.block_d
  return jnp.zeros((tokens + config.block_t, width), jnp.float32)


def forward(x, up, down, inc: lines.Incidences, *, activation: str, line_size: int,
            config: BlockConfig, interpret: bool):
  """y (T, d) in x.dtype from the incidences of a routing (`lines.incidences`)."""
  tokens, d = x.shape
  work = lines.items(inc.line_start, config.block_t, inc.inc_token.shape[0], tokens)
  y = _atomic_buffer(tokens, d, config)
  kernel = functools.partial(_forward_kernel, activation=activation, line_size=line_size,
                             config=config)
  y = common.triton_call(
      kernel, out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype), grid=(work.shape[1],),
      num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
      name="atomic_experts_lines_fwd", input_output_aliases={6: 0})(
          work, inc.inc_token, inc.weights, x, up, down, y)
  return y[:tokens, :d].astype(x.dtype)


def incidence_backward(x, dy, up, down, inc: lines.Incidences, *, activation: str,
                       line_size: int, dweights_dtype, config: BlockConfig,
                       interpret: bool):
  """dx (T, d) in x.dtype and, per incidence and line position, dS and A (in the
  product dtype, the coefficients of the table gradients) and dweights."""
  tokens, d = x.shape
  cap = inc.inc_token.shape[0]
  work = lines.items(inc.line_start, config.block_t, cap, tokens)
  dx = _atomic_buffer(tokens, d, config)
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  per_inc = lambda dtype: jax.ShapeDtypeStruct((cap, line_size), dtype)
  kernel = functools.partial(_backward_kernel, activation=activation, line_size=line_size,
                             config=config)
  dx, ds, a, dw = common.triton_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(dx.shape, dx.dtype), per_inc(cdt), per_inc(cdt),
                 per_inc(dweights_dtype)),
      grid=(work.shape[1],), num_warps=config.num_warps, num_stages=config.num_stages,
      interpret=interpret, name="atomic_experts_lines_bwd", input_output_aliases={7: 0})(
          work, inc.inc_token, inc.weights, x, dy, up, down, dx)
  return dx[:tokens, :d].astype(x.dtype), ds, a, dw


def line_products(coef, vec, inc: lines.Incidences, *, num_experts: int, dtype,
                  config: BlockConfig, interpret: bool):
  """(N, d) in `dtype`: row e = sum over the incidences (t, line of e) of
  coef[incidence, e's position] * vec[t]; every row written once, zeros included."""
  d = vec.shape[1]
  line_size = coef.shape[1]
  kernel = functools.partial(_line_product_kernel, line_size=line_size, config=config)
  return common.triton_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_experts, d), dtype),
      grid=(common.cdiv(d, config.block_d), common.cdiv(line_size, config.block_e),
            inc.line_start.shape[0] - 1),
      num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
      name="atomic_experts_lines_tables")(inc.line_start, inc.inc_token, coef, vec)


# ---------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lines_op(x, up, down, weights, indices, activation, config, interpret):
  return _fwd(x, up, down, weights, indices, activation, config, interpret)[0]


def _fwd(x, up, down, weights, indices, activation, config, interpret):
  inc = lines.incidences(indices, weights, up.shape[0], config.line_size,
                         interpret=interpret)
  y = forward(x, up, down, inc, activation=activation, line_size=config.line_size,
              config=config.forward, interpret=interpret)
  return y, (x, up, down, weights, inc)


def _bwd(activation, config, interpret, residuals, dy):
  x, up, down, weights, inc = residuals
  dx, ds, a, dw = incidence_backward(
      x, dy, up, down, inc, activation=activation, line_size=config.line_size,
      dweights_dtype=weights.dtype, config=config.backward, interpret=interpret)
  tables = functools.partial(line_products, inc=inc, num_experts=up.shape[0],
                             config=config.tables, interpret=interpret)
  dup = tables(ds, x, dtype=up.dtype)
  ddown = tables(a, dy, dtype=down.dtype)
  valid = inc.pair_inc < inc.inc_token.shape[0]
  dweights = jnp.where(valid, dw[jnp.where(valid, inc.pair_inc, 0), inc.pair_pos], 0)
  return dx, dup, ddown, dweights.astype(weights.dtype), None


_lines_op.defvjp(_fwd, _bwd)


def atomic_experts_lines(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                         indices: jax.Array, *, activation: str = "silu",
                         config: LinesConfig = LinesConfig(),
                         interpret: bool | None = None) -> jax.Array:
  """`y_t = sum_k act(<x_t, up[e_tk]>) * weights_tk * down[e_tk]`, (T, d) in x.dtype.

  Same contract as `omnimoe.ops.atomic_experts` (which validates shapes); ids outside
  [0, N) contribute nothing, duplicate pairs add up. Differentiable in x, up, down and
  weights; gradients come back in the dtypes of their inputs, accumulated in float32.
  Built for the dense regime: k in the hundreds to thousands.
  """
  _check(config, activation)
  if not config.line_size:
    config = dataclasses.replace(config, line_size=auto_line_size(up.shape[0]))
  return _lines_op(x, up, down, weights, indices, activation, config,
                   common.resolve_interpret(interpret))
