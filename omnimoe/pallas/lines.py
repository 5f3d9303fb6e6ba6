"""Incidences of tokens and expert lines: the XLA glue of the dense-regime expert kernels.

A *line* is `line_size` consecutive expert ids (line l holds experts l*L .. l*L+L-1; on
the n x n Cartesian grid with L = n a line is a grid row). An *incidence* is a pair
(token, line) such that the token routes at least one pair into the line. The kernels in
`expert_lines` run one program per chunk of a line's incidences: a tile of tokens
against the line's L experts, on tensor cores.

Everything here is O(T k) scatters, gathers and prefix sums plus O(T * num_lines) for the
dedupe, and no sort:
  1. per pair its line and position in the line (ids outside [0, N) have no line);
  2. touched (num_lines, T): a scatter of True at (line, token), then a prefix sum over
     it in line-major order numbers the incidences: incidences of one line are
     contiguous, their tokens in ascending order (good L2 locality, and deterministic);
  3. the dense weights of each incidence, W (capacity, L) float32: a scatter-add of the
     pair weights at (incidence, position), so duplicate pairs add up as in the
     reference; zero where the token has no pair (`_zero_rows` zeroes the rows of the
     real incidences only: rows past them are never read);
  4. work items (`items`): the chunks of `block_t` incidences of every line, in line
     order, so that consecutive programs read the same table rows (L2 reuse).
The capacity is the static bound T * min(num_lines, k) on the number of incidences: the
arrays are sized by it, the kernels touch only the real ones. W is the one large array:
capacity * L * 4 bytes allocated (T * N * 4 once k >= num_lines: 1.7 GB at T = 4096,
N = 102,400), of which I * L * 4 bytes are written (I the real incidences): an XLA
`zeros(...).at[].add` would fill all of it (~0.6 ms at that size), hence the kernel.

Equivalent JAX code (l = e // L, q = e % L for the valid pairs of token t):
  touched[l, t] = any pair;  inc(l, t) = cumsum(touched.ravel())[l * T + t] - 1
  inc_token[inc(l, t)] = t;  line_start = [0] + cumsum(touched.sum(1))
  weights[inc(l, t), q] += w_tk
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from omnimoe.pallas import common

FILL_ROWS = 32
MAX_ELEMENTS = 2 ** 31 - 1  # in-kernel offsets are int32


class Incidences(NamedTuple):
  """The incidence lists of one routing (a pytree of int32 / float32 arrays)."""
  inc_token: jax.Array   # (capacity,) token of each incidence, line after line
  line_start: jax.Array  # (num_lines + 1,) line l: line_start[l] .. line_start[l + 1]
  pair_inc: jax.Array    # (T, k) incidence of each pair; capacity where the id is invalid
  pair_pos: jax.Array    # (T, k) position of each pair's expert in its line
  weights: jax.Array     # (capacity, L) float32 dense routing weights per incidence
                         # (rows past line_start[-1] unset)


def num_lines(num_experts: int, line_size: int) -> int:
  return common.cdiv(num_experts, line_size)


def capacity(tokens: int, k: int, lines: int) -> int:
  """Static bound on the number of incidences: each token has <= min(lines, k)."""
  return max(1, tokens * min(lines, k))


def _zero_rows_kernel(count_ref, out_ref):
  width = out_ref.shape[1]
  rows = common.iota(FILL_ROWS, pl.program_id(0) * FILL_ROWS)
  cols = common.iota(common.pow2(width))
  mask = (rows < count_ref[0])[:, None] & (cols < width)[None, :]
  plt.store(out_ref.at[rows[:, None], cols[None, :]], jnp.zeros(mask.shape, out_ref.dtype),
            mask=mask)


def _zero_rows(shape, count, interpret: bool):
  """A float32 array of `shape` whose first `count` rows are zeros (the rest unset)."""
  return common.triton_call(
      _zero_rows_kernel, out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
      grid=(common.cdiv(shape[0], FILL_ROWS),), num_warps=4, num_stages=1,
      interpret=interpret, name="zero_incidence_rows")(count.reshape(1))


def incidences(indices: jax.Array, weights: jax.Array, num_experts: int, line_size: int,
               *, interpret: bool) -> Incidences:
  """The incidences of a routing `indices` (T, k) int32 with `weights` (T, k)."""
  tokens, k = indices.shape
  lines = num_lines(num_experts, line_size)
  cap = capacity(tokens, k, lines)
  if max(cap * line_size, lines * tokens) > MAX_ELEMENTS:
    raise ValueError(f"{tokens} tokens x {lines} lines of {line_size} experts exceed the "
                     f"kernels' int32 offsets: split the tokens into smaller batches")
  valid = (indices >= 0) & (indices < num_experts)
  line = jnp.where(valid, indices // line_size, lines)          # `lines`: no line
  pos = jnp.where(valid, indices % line_size, 0).astype(jnp.int32)
  token = jnp.broadcast_to(common.iota(tokens)[:, None], indices.shape)
  touched = jnp.zeros((lines, tokens), jnp.bool_).at[line, token].set(True, mode="drop")
  number = (jnp.cumsum(touched.reshape(-1), dtype=jnp.int32) - 1).reshape(lines, tokens)
  inc_token = jnp.zeros(cap, jnp.int32).at[jnp.where(touched, number, cap)].set(
      jnp.broadcast_to(common.iota(tokens)[None, :], touched.shape), mode="drop")
  line_start = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                jnp.cumsum(touched.sum(1, dtype=jnp.int32))])
  pair_inc = jnp.where(valid, number[jnp.minimum(line, lines - 1), token], cap)
  dense = _zero_rows((cap, line_size), line_start[-1], interpret).at[pair_inc, pos].add(
      weights.astype(jnp.float32), mode="drop")
  return Incidences(inc_token, line_start, pair_inc, pos, dense)


def items(line_start: jax.Array, block_t: int, cap: int, tokens: int) -> jax.Array:
  """Work items, the chunks of `block_t` incidences of each line in line order.

  Returns (3, n) int32: row 0 the item's line, rows 1-2 its incidence range [lo, hi)
  (hi is the end of the line: the chunk is lo .. min(lo + block_t, hi)). n is a static
  bound (every line's last chunk may be partial); items past the real ones have
  lo = hi = 0 and do nothing.
  """
  lines = line_start.shape[0] - 1
  n = min(common.cdiv(cap, block_t) + lines, lines * common.cdiv(tokens, block_t))
  chunks = (line_start[1:] - line_start[:-1] + block_t - 1) // block_t
  chunk_end = jnp.cumsum(chunks)
  j = common.iota(n)
  line = jnp.searchsorted(chunk_end, j, side="right").astype(jnp.int32)
  live = line < lines
  l = jnp.minimum(line, lines - 1)
  lo = line_start[l] + (j - (chunk_end[l] - chunks[l])) * block_t
  return jnp.stack([line, jnp.where(live, lo, 0), jnp.where(live, line_start[l + 1], 0)])
