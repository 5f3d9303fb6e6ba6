"""Token-centric atomic-expert kernels: the forward and the backward's dx / dweights.

Reference: `omnimoe.reference.atomic_experts` (forward) and its autodiff (backward); the
custom VJP that ties these kernels together is in `expert_ops`.

Why token-centric here (DESIGN.md section 2). These stages produce per-token outputs
(y, dx: (T, d), and per-pair scalars), so a token-centric program owns its outputs and
needs no sort, no atomics and no scatter. Its cost is one gathered table row per pair
and table: T k d elements each. An expert-centric forward would read each used row once
but must then scatter-add k rows into every y_t: atomics on (T, d) floats, T k d of
them, far slower than the extra gathers, or a (T k, d) intermediate, which is more bytes
than the gathers. The gather excess is small where it matters: at N = 2^20 nearly every
pair has its own expert (unique rows ~ pairs), at N = 4096 both tables sit in L2 (16 MB),
and at N = 65536 (two pairs per used row on average) the gathers read 2x the unique
rows. The sort is kept for where it is unavoidable, the (N, d) weight gradients
(`expert_tables`). Measured on one H100 (bf16, T=4096, d=1024, N=65536, k=32), device
time: forward 0.157 ms, dx/dweights 0.157 ms, each 537 MB of pair gathers at ~3.4 TB/s
(some rows hit L2; copy rate 2.9 TB/s); the best of 14 launch shapes was 2 tokens x 32
pairs x 64 columns on 2 warps. Until v13 the row loads were not vectorised (a clamp on
the column index hid its contiguity from Triton, `common.lanes`): 0.26 and 0.24 ms.
Details and what is left: experiments/kernels_notes.md.

One program owns `block_t` tokens and all their k pairs. Phase 1 streams d in tiles of
`block_d`: for every pair a row tile of the table is gathered (16-byte loads along d)
and multiplied into an elementwise float32 accumulator, reduced over d once at the end
(s = <x_t, U[e]> or da = <dy_t, V[e]>). Phase 2 streams d again: for every pair a row
tile of the other table is gathered, scaled by the pair's coefficient and summed over
the k pairs into the output tile. Expert ids outside [0, N) are clamped for the loads
and masked, so such pairs contribute nothing (the reference's contract).

The two phases also run as kernels of their own, `pair_scores` (phase 1) and
`pair_combine` (phase 2), for the expert op split in two halves with a collective
between them (`omnimoe.expert_parallel`: tables sharded along d, where the scores of a
pair are partial sums over each device's slice of d until one all-reduce adds them). The
fused `forward` / `token_backward` stay the one-device path: they keep s and da in
registers between the phases.

Equivalent JAX code (forward; valid = 0 <= idx < N):
  s = einsum("td,tkd->tk", x, up[idx]);  a = act(s) * w * valid
  y = einsum("tk,tkd->td", a, down[idx])
Backward (dy given): da = einsum("td,tkd->tk", dy, down[idx]); dw = da * act(s) * valid;
  ds = da * w * act'(s) * valid; dx = einsum("tk,tkd->td", ds, up[idx]).
Halves: pair_scores(v, table, idx) = einsum("td,tkd->tk", v, table[idx]) * valid;
  pair_combine(c, table, idx) = einsum("tk,tkd->td", c * valid, table[idx]).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

from omnimoe.pallas import common


@dataclasses.dataclass(frozen=True)
class TokenConfig:
  block_t: int = 0      # tokens per program; 0: `PAIRS_PER_WARP` pairs a warp (`resolve`)
  block_d: int = 64     # hidden-dimension tile
  num_warps: int = 2
  num_stages: int = 3

  def __post_init__(self):
    common.check_pow2("TokenConfig.block_t", self.block_t, auto=True)
    common.check_pow2("TokenConfig.block_d", self.block_d)
    common.check_pow2("TokenConfig.num_warps", self.num_warps)


# A program's phase-1 accumulator and phase-2 tile are (pairs x block_d) float32, spread
# over its warps. H100, bf16, T = 4096 and 16,384, N = 65,536, k = 32, 14 launch shapes
# (kernels_notes.md, v13): best 2 tokens (64 pairs) x 64 columns on 2 warps, for the
# backward and the forward kernel alike (4 tokens on 4 warps: 11-13 % slower). A fixed
# token count would halve the pairs in flight at k = 16, so the block holds a constant
# number of pairs per warp.
PAIRS_PER_WARP = 32


def resolve(config: TokenConfig, k: int) -> TokenConfig:
  """`config` with block_t = PAIRS_PER_WARP num_warps // pow2(k) (>= 1) where it is 0."""
  if config.block_t:
    return config
  pairs = PAIRS_PER_WARP * config.num_warps
  return dataclasses.replace(config, block_t=max(1, pairs // common.pow2(k)))


def _pair_experts(idx_ref, rows, live, num_experts: int):
  """Clamped expert ids (BT, K), the pairs that exist, and the pairs that count."""
  k = idx_ref.shape[1]
  _, slots, in_k = common.lanes(common.pow2(k), k)
  exists = live[:, None] & in_k[None, :]
  e = plt.load(idx_ref.at[rows[:, None], slots[None, :]], mask=exists, other=-1)
  valid = exists & (e >= 0) & (e < num_experts)
  return jnp.where(valid, e, 0), exists, valid


def _load_pairs(rows, valid, *refs):
  """ref[t, j] of every pair (BT, K) float32, for each (T, k) ref; 0 where not valid."""
  slots = common.lanes(valid.shape[1], refs[0].shape[1])[1][None, :]
  return [plt.load(ref.at[rows[:, None], slots], mask=valid, other=0.0).astype(jnp.float32)
          for ref in refs]


def _gather_tile(table_ref, experts, valid, c: int, block_d: int):
  """Tile c of the table rows of every pair: (BT, K, block_d) float32, zero where masked."""
  _, cols, in_d = common.lanes(block_d, table_ref.shape[1], c)
  return plt.load(table_ref.at[experts[:, :, None], cols[None, None, :]],
                  mask=valid[:, :, None] & in_d[None, None, :], other=0.0).astype(jnp.float32)


def _gather_dot(vec_ref, table_ref, rows, live, experts, valid, block_d: int):
  """<vec[t], table[e_tj]> for every pair (BT, K), float32."""
  d = vec_ref.shape[1]

  def tile(c, acc):
    _, cols, in_d = common.lanes(block_d, d, c)
    v = plt.load(vec_ref.at[rows[:, None], cols[None, :]],
                 mask=live[:, None] & in_d[None, :], other=0.0).astype(jnp.float32)
    return acc + v[:, None, :] * _gather_tile(table_ref, experts, valid, c, block_d)

  acc = jnp.zeros(experts.shape + (block_d,), jnp.float32)
  return jnp.sum(lax.fori_loop(0, common.cdiv(d, block_d), tile, acc), axis=2)


def _gather_combine(coef, table_ref, out_ref, t, live, experts, valid, block_d: int):
  """out[t] = sum_j coef[t, j] table[e_tj], tile by tile, stored in out_ref.dtype."""
  d = out_ref.shape[1]

  def tile(c, carry):
    cols, _, in_d = common.lanes(block_d, d, c)
    out = jnp.sum(coef[:, :, None] * _gather_tile(table_ref, experts, valid, c, block_d),
                  axis=1)
    plt.store(out_ref.at[t[:, None], cols[None, :]], out.astype(out_ref.dtype),
              mask=live[:, None] & in_d[None, :])
    return carry

  lax.fori_loop(0, common.cdiv(d, block_d), tile, 0)


def _store_pairs(ref, t, exists, value):
  slots = common.iota(value.shape[1])[None, :]
  plt.store(ref.at[t[:, None], slots], value.astype(ref.dtype), mask=exists)


def pair_coefficients(da, g, s, valid, activation: str):
  """The backward's per-pair values from da = <dy, V[e]>, the weight g and s = <x, U[e]>
  (float32, 0 where not valid): dweights = da act(s), ds = da g act'(s), a = act(s) g.
  Elementwise: inside the token backward kernel, or in XLA (`expert_ops`, bucket order)."""
  act, act_grad = common.activation_with_grad(activation, s)
  return (jnp.where(valid, da * act, 0.0), jnp.where(valid, da * g * act_grad, 0.0),
          jnp.where(valid, act * g, 0.0))


def _forward_kernel(x_ref, up_ref, down_ref, w_ref, idx_ref, y_ref, s_ref, *,
                    activation: str, config: TokenConfig):
  t, live, rows = common.token_block(config.block_t, x_ref.shape[0])
  experts, exists, valid = _pair_experts(idx_ref, rows, live, up_ref.shape[0])
  s = _gather_dot(x_ref, up_ref, rows, live, experts, valid, config.block_d)
  [g] = _load_pairs(rows, valid, w_ref)
  act, _ = common.activation_with_grad(activation, s)
  _store_pairs(s_ref, t, exists, s)
  _gather_combine(jnp.where(valid, act * g, 0.0), down_ref, y_ref, t, live, experts, valid,
                  config.block_d)


def _token_backward_kernel(dy_ref, up_ref, down_ref, w_ref, idx_ref, s_ref,
                           dx_ref, dw_ref, ds_ref, a_ref, *, activation: str,
                           config: TokenConfig):
  t, live, rows = common.token_block(config.block_t, dy_ref.shape[0])
  experts, exists, valid = _pair_experts(idx_ref, rows, live, up_ref.shape[0])
  da = _gather_dot(dy_ref, down_ref, rows, live, experts, valid, config.block_d)
  g, s = _load_pairs(rows, valid, w_ref, s_ref)
  dw, ds, a = pair_coefficients(da, g, s, valid, activation)
  _store_pairs(dw_ref, t, exists, dw)
  _store_pairs(ds_ref, t, exists, ds)
  _store_pairs(a_ref, t, exists, a)
  _gather_combine(ds, up_ref, dx_ref, t, live, experts, valid, config.block_d)


def _pair_scores_kernel(vec_ref, table_ref, idx_ref, s_ref, *, config: TokenConfig):
  t, live, rows = common.token_block(config.block_t, vec_ref.shape[0])
  experts, exists, valid = _pair_experts(idx_ref, rows, live, table_ref.shape[0])
  s = _gather_dot(vec_ref, table_ref, rows, live, experts, valid, config.block_d)
  _store_pairs(s_ref, t, exists, s)


def _pair_combine_kernel(coef_ref, table_ref, idx_ref, out_ref, *, config: TokenConfig):
  t, live, rows = common.token_block(config.block_t, out_ref.shape[0])
  experts, _, valid = _pair_experts(idx_ref, rows, live, table_ref.shape[0])
  [coef] = _load_pairs(rows, valid, coef_ref)
  _gather_combine(coef, table_ref, out_ref, t, live, experts, valid, config.block_d)


def _launch(kernel, name, out_shape, tokens, config: TokenConfig, interpret: bool):
  return common.triton_call(kernel, out_shape=out_shape,
                            grid=(common.cdiv(tokens, config.block_t),),
                            num_warps=config.num_warps, num_stages=config.num_stages,
                            interpret=interpret, name=name)


def forward(x, up, down, weights, indices, *, activation: str, config: TokenConfig,
            interpret: bool):
  """y (T, d) in x.dtype and the pre-activations s (T, k) float32 (kept for backward)."""
  config = resolve(config, indices.shape[1])
  kernel = functools.partial(_forward_kernel, activation=activation, config=config)
  out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct(indices.shape, jnp.float32))
  return _launch(kernel, "atomic_experts_fwd", out_shape, x.shape[0], config,
                 interpret)(x, up, down, weights, indices)


def token_backward(dy, up, down, weights, indices, s, *, activation: str,
                   config: TokenConfig, interpret: bool):
  """dx (T, d) in dy.dtype, dweights (T, k) in weights.dtype, and per pair (float32)
  ds = d(loss)/ds and a = act(s) * w, the coefficients of the table gradients."""
  config = resolve(config, indices.shape[1])
  kernel = functools.partial(_token_backward_kernel, activation=activation, config=config)
  pair = jax.ShapeDtypeStruct(indices.shape, jnp.float32)
  out_shape = (jax.ShapeDtypeStruct(dy.shape, dy.dtype),
               jax.ShapeDtypeStruct(indices.shape, weights.dtype), pair, pair)
  return _launch(kernel, "atomic_experts_bwd_tokens", out_shape, dy.shape[0], config,
                 interpret)(dy, up, down, weights, indices, s)


def pair_scores(vec, table, indices, *, config: TokenConfig, interpret: bool):
  """`<vec_t, table[e_tk]>` for every pair, (T, k) float32, 0 where e_tk is outside [0, N):
  phase 1 of `forward` (s from x, U) or of `token_backward` (da from dy, V) on its own."""
  config = resolve(config, indices.shape[1])
  kernel = functools.partial(_pair_scores_kernel, config=config)
  out_shape = jax.ShapeDtypeStruct(indices.shape, jnp.float32)
  return _launch(kernel, "atomic_experts_pair_scores", out_shape, vec.shape[0], config,
                 interpret)(vec, table, indices)


def pair_combine(coef, table, indices, *, out_dtype, config: TokenConfig, interpret: bool):
  """`sum_k coef_tk table[e_tk]`, (T, d) in out_dtype (float32 sums); pairs with e_tk
  outside [0, N) add nothing: phase 2 of `forward` (y from a, V) or of `token_backward`
  (dx from ds, U) on its own."""
  config = resolve(config, indices.shape[1])
  kernel = functools.partial(_pair_combine_kernel, config=config)
  out_shape = jax.ShapeDtypeStruct((indices.shape[0], table.shape[1]), out_dtype)
  return _launch(kernel, "atomic_experts_pair_combine", out_shape, indices.shape[0], config,
                 interpret)(coef, table, indices)
