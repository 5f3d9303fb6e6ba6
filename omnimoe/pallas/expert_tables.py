"""Expert-centric table gradients dU, dV: segment sums over pairs grouped by expert.

Reference: the `up` / `down` cotangents of `omnimoe.reference.atomic_experts`
(dU[e] = sum over pairs (t, e) of ds_tk x_t, dV[e] = sum of a_tk dy_t, DESIGN.md
section 1); the custom VJP that calls this is in `expert_ops`.

Why expert-centric here: these are the only outputs of (N, d) size. Token-centric they
would be a scatter-add of T k rows into the tables (atomics on N d floats, and a zero
fill first). Expert-centric, a program owns `bucket_size` consecutive experts and one
`block_d` column tile of both gradients, reads the pairs of its bucket (contiguous
after `bucketing.bucket_pairs`), gathers their x and dy rows (small (T, d) arrays that
stay in L2) and writes its tile of dU and dV exactly once, zeros included: no atomics,
no separate zero fill, every table byte written once with coalesced stores. Each pair's
token, expert id, ds and a are first gathered into bucket order by XLA (four (T k,)
gathers), so the kernel reads them contiguously instead of through `order`: one dependent
load less before the row gathers, measured 2-10 % faster on one H200 (kernels_notes.md,
v7).

The segment sum runs on tensor cores: for a chunk of `block_p` pairs of the bucket,
  dU[bucket] += H_ds @ X,   H_ds[r, p] = ds_p if pair p's expert is bucket row r else 0
(a (bucket_size x block_p) one-hot-by-expert matrix scaled by ds), X the gathered
(block_p x block_d) rows of x; the same with a and dy for dV. This needs no sort inside
the bucket and no per-expert loop with a data-dependent trip count. For bfloat16 inputs
the coefficients enter the product rounded to bfloat16 (products and sums in float32);
float32 inputs multiply in full float32. The bucket size (`auto_bucket_size`) is at
least 16 experts (a tensor-core operand), at most what keeps the two float32 accumulators
in registers (a 128 x 128 bucket tile spilled and ran 2.6x its write floor at N=2^20),
and in between just enough for ~16 pairs per bucket (each pair costs 2 * bucket_size * d
flops per table in the one-hot product). At the default launch (4 warps, 256 columns) the
register cap is the minimum: 16 experts whatever the density, for every d >= 256.
Measured on one H100 (bf16, T=4096, d=1024, k=32), device time: 0.20 ms at N=65536
including bucketing and the gathers into bucket order (the kernel 0.165; write floor
0.09 ms), 1.85 ms at N=2^20 (floor 1.5 ms: the dense gradients are 4.3 GB); 0.31 and
2.17 ms for the kernel before its row gathers were 16-byte loads (v13, `common.lanes`).
Details: experiments/kernels_notes.md.

Equivalent JAX code:
  du = zeros((N, d)).at[idx].add(ds[..., None] * x[:, None, :])   # invalid ids dropped
  dv = zeros((N, d)).at[idx].add(a[..., None] * dy[:, None, :])
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

from omnimoe.pallas import bucketing, common


@dataclasses.dataclass(frozen=True)
class TableConfig:
  bucket_size: int = 0   # experts per program; 0: `auto_bucket_size`
  block_p: int = 0       # pairs per tensor-core step; 0: `auto_block_p`
  block_d: int = 256     # hidden-dimension tile
  num_warps: int = 4
  num_stages: int = 2
  bucketing: str = "atomic"

  def __post_init__(self):
    dot = " (a tensor-core operand dimension)"
    common.check_pow2("TableConfig.bucket_size", self.bucket_size, minimum=16, auto=True,
                      why=dot)
    common.check_pow2("TableConfig.block_p", self.block_p, minimum=16, auto=True, why=dot)
    common.check_pow2("TableConfig.block_d", self.block_d, minimum=16, why=dot)
    common.check_pow2("TableConfig.num_warps", self.num_warps)
    if self.bucketing not in bucketing.METHODS:
      raise ValueError(f"TableConfig.bucketing must be one of {bucketing.METHODS}, got "
                       f"{self.bucketing!r}")


# Two (bucket_size x block_d) float32 accumulators live in registers: past 64 per thread
# they spill (seen: bucket 128 x 128 columns ran at 3.9 ms for N = 2^20, ~3x its floor).
_ACC_PER_WARP = 64 * 32 // 2


def auto_bucket_size(config: TableConfig, pairs: int, num_experts: int) -> int:
  """Experts per bucket: pow2(16 N / pairs) (~16 pairs per bucket), clamped to
  [16, fit], fit = `_ACC_PER_WARP` num_warps / block_d (the register budget).

  `config.block_d` is the column tile the kernel runs (`table_gradients` narrows it to
  pow2(d) first). The cap decides at the default 4 warps x 256 columns (fit = 16: 16
  experts at every density); the density term only acts where fit > 16: tiles narrower
  than 256 columns (d < 256 or a smaller block_d) or more warps.
  """
  if config.bucket_size:
    return config.bucket_size
  fit = _ACC_PER_WARP * config.num_warps // config.block_d
  want = common.pow2(int(16 * num_experts / max(pairs, 1)), minimum=16)
  return int(max(16, min(want, fit)))


def auto_block_p(config: TableConfig, pairs: int, num_experts: int, bucket_size: int) -> int:
  """16 pairs per step where buckets are sparse (measured best at N = 65536), 32 where
  each bucket holds many (N = 4096: hundreds of pairs per bucket)."""
  if config.block_p:
    return config.block_p
  return 16 if pairs * bucket_size <= 64 * num_experts else 32


def _table_grad_kernel(starts_ref, token_ref, expert_ref, ds_ref, a_ref, x_ref, dy_ref,
                       du_ref, dv_ref, *, bucket_size: int, block_p: int, block_d: int):
  num_experts, d = du_ref.shape
  pairs = token_ref.shape[0]
  b, c = pl.program_id(0), pl.program_id(1)
  lo, hi = starts_ref[b], starts_ref[b + 1]
  experts = common.iota(bucket_size, b * bucket_size)
  cols, cols_c, in_d = (v[None, :] for v in common.lanes(block_d, d, c))
  cdt = common.mma_dtype(x_ref.dtype, dy_ref.dtype)

  def chunk(i, accs):
    pos = common.iota(block_p, lo + i * block_p)
    live = pos < hi
    p = jnp.minimum(pos, pairs - 1)
    e = plt.load(expert_ref.at[p], mask=live, other=-1)
    hit = (experts[:, None] == e[None, :]) & live[None, :]
    rows = plt.load(token_ref.at[p], mask=live, other=0)[:, None]
    mask = live[:, None] & in_d

    def product(coef_ref, vec_ref):
      coef = plt.load(coef_ref.at[p], mask=live, other=0.0)
      vec = plt.load(vec_ref.at[rows, cols_c], mask=mask, other=0.0)
      return common.dot(jnp.where(hit, coef[None, :], 0.0).astype(cdt), vec.astype(cdt))

    acc_u, acc_v = accs
    return acc_u + product(ds_ref, x_ref), acc_v + product(a_ref, dy_ref)

  zeros = jnp.zeros((bucket_size, block_d), jnp.float32)
  acc_u, acc_v = lax.fori_loop(0, (hi - lo + block_p - 1) // block_p, chunk, (zeros, zeros))
  out = (experts[:, None], cols)
  mask = (experts < num_experts)[:, None] & in_d
  plt.store(du_ref.at[out], acc_u.astype(du_ref.dtype), mask=mask)
  plt.store(dv_ref.at[out], acc_v.astype(dv_ref.dtype), mask=mask)


class Buckets(NamedTuple):
  """The pairs grouped by expert bucket (`bucketing.bucket_pairs`), with each pair's token
  and expert id gathered into that order (XLA gathers, so kernels read them contiguously).
  A pytree of arrays: made once in the forward, kept for the backward."""
  order: jax.Array    # (T k,) pair ids p = t k + j, bucket after bucket, clipped into range
  starts: jax.Array   # (B + 1,) bucket b holds order[starts[b]:starts[b + 1]]
  token: jax.Array    # (T k,) order // k
  expert: jax.Array   # (T k,) the pairs' expert ids in that order


def launch_config(config: TableConfig, d: int) -> TableConfig:
  """`config` with its column tile narrowed to pow2(d) (>= 16), as the kernel runs it."""
  return dataclasses.replace(config, block_d=min(config.block_d, common.pow2(d, 16)))


def bucket(indices, *, num_experts: int, d: int, config: TableConfig,
           interpret: bool) -> Buckets:
  """The table kernel's grouping of the (T, k) pairs, for hidden size d."""
  tokens, k = indices.shape
  bucket_size = auto_bucket_size(launch_config(config, d), tokens * k, num_experts)
  order, starts = bucketing.bucket_pairs(indices, num_experts, bucket_size,
                                         method=config.bucketing, interpret=interpret)
  order = jnp.clip(order, 0, tokens * k - 1)  # in range whatever the unused tail holds
  return Buckets(order, starts, order // k, indices.reshape(-1)[order])


def table_gradients(x, dy, indices, ds, a, *, num_experts: int, up_dtype, down_dtype,
                    config: TableConfig, interpret: bool, buckets: Buckets | None = None):
  """dU (N, d) in up_dtype and dV (N, d) in down_dtype from per-pair ds and a (T, k).

  `buckets`: `bucket(indices, ...)` with the same config, if the caller already has it.
  """
  tokens, k = indices.shape
  d = x.shape[1]
  config = launch_config(config, d)
  bucket_size = auto_bucket_size(config, tokens * k, num_experts)
  block_p = auto_block_p(config, tokens * k, num_experts, bucket_size)
  if buckets is None:
    buckets = bucket(indices, num_experts=num_experts, d=d, config=config,
                     interpret=interpret)
  in_bucket_order = (buckets.token, buckets.expert,
                     *(v.reshape(-1)[buckets.order] for v in (ds, a)))
  kernel = functools.partial(_table_grad_kernel, bucket_size=bucket_size, block_p=block_p,
                             block_d=config.block_d)
  return common.triton_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((num_experts, d), up_dtype),
                 jax.ShapeDtypeStruct((num_experts, d), down_dtype)),
      grid=(buckets.starts.shape[0] - 1, common.cdiv(d, config.block_d)),
      num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
      name="atomic_experts_bwd_tables")(
          buckets.starts, *in_bucket_order, x, dy)
