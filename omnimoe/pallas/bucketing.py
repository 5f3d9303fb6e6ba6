"""Group the T*k (token, expert) pairs by expert bucket: histogram, prefix sum, placement.

Reference: the same grouping as a stable `jnp.argsort` of the bucket ids (method="sort"
below, kept as the oracle and for comparison); the table-gradient kernels in
`expert_tables` only need each bucket's pairs to be contiguous, not sorted inside.

Why not argsort: an XLA argsort of 131072 int32 ids costs ~0.15 ms on an H100 (a radix
sort over all 32 key bits, keys and values), half a layer's forward budget. A bucket is
`bucket_size` consecutive experts, so there are only N / bucket_size keys to separate:
  1. counts: an XLA scatter-add of ones (int32, so exact and order-free);
  2. starts: an XLA cumsum of the counts;
  3. placement (this kernel): each program takes `BLOCK_P` pairs, ranks them inside its
     block by bucket with a block_p x block_p comparison (no sort: rank = number of
     earlier lanes with the same bucket), and the first lane of each bucket claims room
     for all of them with one atomic add on that bucket's cursor. Every pair lands at
     cursor + rank. The order of blocks inside a bucket depends on which atomic lands
     first, so the *set* of pairs per bucket is deterministic and their order is not:
     the table gradients then sum in a run-dependent order (last-bit differences in
     float32, as with XLA's own scatter-add on GPU). method="sort" is deterministic.
Lanes that are not a bucket's first lane aim their (zero) atomic at a private spare
cursor, so one atomic never carries duplicate addresses (Pallas' interpreter would lose
such updates; on the GPU it also avoids intra-warp contention). The cursors are float32:
the Triton lowering of Pallas (JAX 0.10-0.11) emits a float add for an atomic whose value
is a vector, whatever its dtype, so int32 cursors came back as garbage on the GPU;
float32 counts are exact below 2^24 pairs, and more pairs take method="sort".

Measured on one H100 (131072 pairs): 0.035-0.049 ms for the three steps, against
0.11-0.12 ms for the stable argsort (N=65536 and 2^20).

Pairs whose expert id lies outside [0, N) go to no bucket: they are dropped here, which
is how the table gradients mask them.

Equivalent JAX code:
  bucket = where(valid, e // bucket_size, B);  order = argsort(bucket, stable=True)
  starts = concatenate([[0], cumsum(bincount(bucket, length=B))])
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plt

from omnimoe.pallas import common

METHODS = ("atomic", "sort")
BLOCK_P = 64
MAX_ATOMIC_PAIRS = 2 ** 24  # float32 cursors count exactly up to here


def _place_kernel(bucket_ref, cursor_in_ref, order_ref, cursor_ref, *, num_buckets: int):
  del cursor_in_ref  # aliased with cursor_ref
  pairs = bucket_ref.shape[0]
  pos, in_range, pos_c = common.token_block(BLOCK_P, pairs)
  b = plt.load(bucket_ref.at[pos_c], mask=in_range, other=num_buckets)
  live = in_range & (b < num_buckets)
  lane = common.iota(BLOCK_P)
  same = (b[:, None] == b[None, :]) & live[:, None] & live[None, :]
  rank = jnp.sum((same & (lane[None, :] < lane[:, None])).astype(jnp.int32), axis=1)
  count = jnp.sum(same.astype(jnp.int32), axis=1)
  first = live & (rank == 0)
  target = jnp.where(first, b, num_buckets + lane)
  claimed = plt.atomic_add(cursor_ref, target, jnp.where(first, count, 0).astype(jnp.float32))
  base = jnp.sum(jnp.where(same & first[None, :], claimed.astype(jnp.int32)[None, :], 0),
                 axis=1)
  plt.store(order_ref.at[jnp.where(live, base + rank, pairs)], pos, mask=live)


def bucket_pairs(indices: jax.Array, num_experts: int, bucket_size: int, *,
                 method: str = "atomic", interpret: bool = False):
  """Pairs grouped by bucket e // bucket_size.

  Args:
    indices: (T, k) int32 expert ids; pairs are numbered p = t * k + j.
  Returns:
    order: (T*k,) int32 pair ids, bucket after bucket (entries past starts[-1] unused).
    starts: (B + 1,) int32, bucket b's pairs are order[starts[b]:starts[b + 1]],
      B = ceil(num_experts / bucket_size).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  flat = indices.reshape(-1)
  num_buckets = common.cdiv(num_experts, bucket_size)
  valid = (flat >= 0) & (flat < num_experts)
  bucket = jnp.where(valid, flat // bucket_size, num_buckets).astype(jnp.int32)
  counts = jnp.zeros(num_buckets + 1, jnp.int32).at[bucket].add(1)
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts[:num_buckets])])
  if method == "sort" or flat.shape[0] >= MAX_ATOMIC_PAIRS:
    return jnp.argsort(bucket, stable=True).astype(jnp.int32), starts
  cursor = jnp.concatenate([starts[:num_buckets], jnp.zeros(BLOCK_P, jnp.int32)]
                           ).astype(jnp.float32)
  kernel = functools.partial(_place_kernel, num_buckets=num_buckets)
  order, _ = common.triton_call(
      kernel, out_shape=(jax.ShapeDtypeStruct(flat.shape, jnp.int32),
                         jax.ShapeDtypeStruct(cursor.shape, jnp.float32)),
      grid=(common.cdiv(flat.shape[0], BLOCK_P),), num_warps=4, num_stages=1,
      interpret=interpret, name="bucket_pairs", input_output_aliases={1: 1})(bucket, cursor)
  return order, starts
