"""Atomic experts with a custom VJP over the Pallas kernels.

Reference: `omnimoe.reference.atomic_experts` (values) and its autodiff (gradients).
This file holds no kernel: it wires the stages together and is independent of the
backend the kernels are written for.

  forward   alone (inference, evaluation): XLA gathers in chunks of 8 pairs, or one
            gather for few pairs (`_xla_forward`, `forward_chunk`); where the backward
            follows (the custom VJP's forward rule): the token kernel
            expert_tokens.forward (config.forward_impl, "auto" below): y, and s kept
            for backward
  backward  expert_tokens.token_backward  token-centric: dx, dweights, per-pair ds and a
            expert_tables.table_gradients expert-centric: bucketing, then dU, dV
                                          as tensor-core segment sums

Why this split (cost model, DESIGN.md section 2): the (T, d) outputs are cheapest where
a program owns its tokens (no sort, no atomics), at the price of one table-row gather
per pair; the (N, d) gradients are cheapest where a program owns its experts (each
gradient row written once, no scatter). The sort (here a cheaper bucketing) exists only
in the backward, where the gradients need it. The module docstrings give the details;
experiments/kernels_notes.md gives the measured numbers. On one H100 (bf16, T=4096,
d=1024, N=65536, k=32), device time: forward 0.159 ms, forward+backward 0.534 ms (v13;
plain XLA gathers: 0.560 / 3.241 ms; published Triton: 1.06 / 4.75 ms).

Which forward (`forward_impl`): alone, the XLA gathers win or tie (op N = 65536 0.159
against the kernel's 0.156 ms, N = 2^20 0.198 against 0.214; layer 0.389 against 0.394,
N = 2^20 0.516 against 0.536), while the kernel wins wherever the backward follows (op
fwd+bwd 0.552 -> 0.534, layer 1.178 -> 1.152, training step 61.2 -> 60.0 ms; RESULTS.md,
"Vectorised row gathers", item 7). So "auto", the default, runs the XLA forward where
the forward runs alone and the kernel in the custom VJP's forward rule (under grad,
vjp or linearize). The two sum in different orders: a loss taken under grad and the
same loss evaluated alone can differ in the last bits.

Where the pair scores run under differentiation (`pair_scores`): "tokens" (the default),
inside the fused token kernels, each pair gathering its U row (forward) and V row
(backward) in token order; "buckets" (`expert_buckets`), the forward groups the pairs by
expert bucket once (the grouping the table gradients need anyway, kept for the
backward) and computes s = <x, U[e]> and da = <dy, V[e]> in that order, so a row that
serves several pairs is read about once, then y and dx by `expert_tokens.pair_combine`.
It moves the bucketing from the backward to the forward and splits each fused kernel in
two. Timed on one H100 (`bench_kernels.py --parts variants`, RESULTS.md "Pair scores in
bucket order, timed"): layer fwd+bwd 1.127 -> 1.117 ms at N = 65,536, 2.961 -> 3.005 at
N = 2^20, the op alone 1-2.5 % slower (device time); so "tokens" stays the default.

Density: this file serves k ~ 16..128, where each table row serves a few tokens. Where
k is a sizeable fraction of N (the paper's headline regime, k in the thousands),
`atomic_experts` hands the whole op to `expert_dense` (the whole grid as tensor-core
GEMMs, the routing as a mask); `choose_path` holds the rule and the measured crossover.
The expert-line kernels (`expert_lines`, routed tiles on tensor cores) are selectable
with `path="lines"`; measured slower than `expert_dense` at the headline (see there).

Gradients of up/down come back in the tables' dtype, dx in x's, dweights in weights';
all accumulation is float32.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from omnimoe import reference
from omnimoe.pallas import (common, expert_buckets, expert_dense, expert_lines, expert_tables,
                            expert_tokens, second_order)

TokenConfig = expert_tokens.TokenConfig
TableConfig = expert_tables.TableConfig
ScoreConfig = expert_buckets.ScoreConfig
FORWARD_IMPLS = ("auto", "xla", "kernel")
PAIR_SCORES = ("tokens", "buckets")
PATHS = ("tokens", "dense", "lines")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  forward: TokenConfig = TokenConfig()
  backward: TokenConfig = TokenConfig()
  tables: TableConfig = TableConfig()
  # "xla": `_xla_forward`; "kernel": expert_tokens.forward; "auto": the XLA forward alone,
  # the kernel under differentiation (module docstring)
  forward_impl: str = "auto"
  xla_forward_chunk: int = 0  # pairs per token one XLA gather fusion takes; 0: `forward_chunk`
  # Under differentiation, where s = <x, U[e]> and da = <dy, V[e]> are computed: "tokens",
  # inside the fused token kernels; "buckets", in the table gradients' bucket order
  # (`expert_buckets`; the forward buckets the pairs once, the backward reuses it)
  pair_scores: str = "tokens"
  scores: ScoreConfig = ScoreConfig()
  path: str = "auto"  # "auto": `choose_path`; "tokens": this file; "dense"; "lines"
  dense: expert_dense.DenseConfig = expert_dense.DenseConfig()
  lines: expert_lines.LinesConfig = expert_lines.LinesConfig()

  def __post_init__(self):
    if self.forward_impl not in FORWARD_IMPLS:
      raise ValueError(f"ExpertConfig.forward_impl must be one of {FORWARD_IMPLS}, got "
                       f"{self.forward_impl!r}")
    chunk = self.xla_forward_chunk
    if not isinstance(chunk, numbers.Integral) or chunk < 0:
      raise ValueError(f"ExpertConfig.xla_forward_chunk must be 0 (auto) or an integer >= 1, "
                       f"got {chunk!r}")
    if self.pair_scores not in PAIR_SCORES:
      raise ValueError(f"ExpertConfig.pair_scores must be one of {PAIR_SCORES}, got "
                       f"{self.pair_scores!r}")
    if self.path != "auto" and self.path not in PATHS:
      raise ValueError(f"ExpertConfig.path must be 'auto' or one of {PATHS}, got "
                       f"{self.path!r}")


# Break-even N / k of the two paths, by k: dense costs ~T N (GEMMs over the whole grid),
# tokens ~T k c(k) where the measured per-pair cost c(k) grows with k. Measured fwd+bwd,
# H100, bf16, T = 4096, d = 1024, after the token and table kernels' 16-byte row loads
# (experiments/RESULTS.md, "Path crossover", v13): N = 4096: tokens wins at k = 16,
# ties at 32 (0.340 against 0.343 ms; forward 0.096 against 0.126), dense at 64 (0.360
# against 0.649), so the first break-even sits between N / k = 64 and 128 (90, their
# geometric mean); N = 102,400: a tie at k = 128 (7.14 / 7.10), dense from 160; N = 2^20:
# tokens at 512, dense at 2048. (On one H200 before v13 dense already won at N = 4096,
# k = 32: the first ratio was 160.)
DENSE_BREAK_EVEN = ((64, 90), (128, 350), (None, 640))  # (k up to, N / k ratio)


def choose_path(tokens: int, k: int, num_experts: int) -> str:
  """"dense" where the whole-grid GEMMs beat the pair gathers (N <= ratio(k) k, the
  measured break-even above) and the pairs use a good part of the table (T k >= N / 2:
  the dense path reads both whole tables), else "tokens".

  The second condition decides for few tokens at a large k (decoding). Measured forward,
  one H100, bf16, N = 102,400, d = 1024 (RESULTS.md, "Decoding"): T = 16, k = 4096
  (T k = 0.64 N) dense 0.164 ms against one XLA gather 0.301; T = 64, k = 512 (0.32 N)
  dense 0.178 against 0.159; T = 1, k = 4096 dense 0.160 against 0.037-0.085."""
  ratio = next(r for k_max, r in DENSE_BREAK_EVEN if k_max is None or k <= k_max)
  dense = num_experts <= ratio * k and 2 * tokens * k >= num_experts
  return "dense" if dense else "tokens"


# Up to this many (token, expert) pairs the XLA forward is one gather fusion: with few
# pairs, chunks of 8 cost a launch each and gain nothing. Measured forward of the token
# path, one H100, bf16, N = 102,400, d = 1024 (RESULTS.md, "Decoding"), chunks of 8 ->
# one gather: T = 1, k = 4096 0.730 -> 0.084 ms; T = 16, k = 512 0.219 -> 0.085;
# T = 64, k = 512 (32,768 pairs) 0.186 -> 0.158. At T = 4096, k = 32 (131,072 pairs) one
# fusion no longer fuses the gather: 0.55 ms against 0.154 in chunks of 8 (N = 65,536).
ONE_GATHER_MAX_PAIRS = 32768


def forward_chunk(config: ExpertConfig, tokens: int, k: int) -> int:
  """Pairs per token of one XLA gather fusion: config.xla_forward_chunk if set, else k
  (one fusion) up to ONE_GATHER_MAX_PAIRS pairs, else 8."""
  if config.xla_forward_chunk:
    return config.xla_forward_chunk
  return k if tokens * k <= ONE_GATHER_MAX_PAIRS else 8


def _xla_forward(x, up, down, weights, indices, activation, chunk: int):
  """The forward as XLA gathers + einsums, `chunk` pairs per token at a time: y and s,
  as `expert_tokens.forward` returns them.

  Why: XLA fuses each table gather of a few pairs per token into its einsum and streams
  the rows at ~3.4 TB/s (some hit L2). The token kernel matches it alone since its row
  loads are 16-byte vectors (v13: 0.156 against 0.159 ms device time, H100, bf16,
  T = 4096, d = 1024, N = 65536, k = 32; before, at ~2.0 TB/s, 0.26), but not at
  N = 2^20 or inside the layer (module docstring). Chunk size (v4, host-timed): k = 32
  0.172 ms in chunks of 8, 0.182 in chunks of 16, one unchunked XLA fusion 0.59 (at
  k = 32 it no longer fuses the gather); k = 16 0.097 / 0.102. The backward stays on
  the kernels (it needs no (N, d) scatter here).
  """
  f32 = jnp.float32
  valid, safe = reference.valid_ids(indices, up.shape[0])
  y, s = jnp.zeros(x.shape, f32), []
  for j in range(0, indices.shape[1], chunk):
    e = safe[:, j:j + chunk]
    s.append(jnp.einsum("td,tkd->tk", x.astype(f32), jnp.take(up, e, axis=0).astype(f32)))
    a = (reference.ACTIVATIONS[activation](s[-1]) * weights[:, j:j + chunk].astype(f32)
         * valid[:, j:j + chunk])
    y = y + jnp.einsum("tk,tkd->td", a, jnp.take(down, e, axis=0).astype(f32))
  return y.astype(x.dtype), jnp.concatenate(s, axis=1)


def _forward(x, up, down, weights, indices, activation, config, interpret, impl: str):
  """y and s by `impl`, "xla" or "kernel"."""
  if impl == "xla":
    return _xla_forward(x, up, down, weights, indices, activation,
                        forward_chunk(config, *indices.shape))
  return expert_tokens.forward(x, up, down, weights, indices, activation=activation,
                               config=config.forward, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _atomic_experts(x, up, down, weights, indices, activation, config, interpret):
  impl = "xla" if config.forward_impl == "auto" else config.forward_impl
  return _forward(x, up, down, weights, indices, activation, config, interpret, impl)[0]


def _fwd(x, up, down, weights, indices, activation, config, interpret):
  if config.pair_scores == "buckets":
    return _fwd_buckets(x, up, down, weights, indices, activation, config, interpret)
  impl = "kernel" if config.forward_impl == "auto" else config.forward_impl
  y, s = _forward(x, up, down, weights, indices, activation, config, interpret, impl)
  return y, (x, up, down, weights, indices, s, None)


def _fwd_buckets(x, up, down, weights, indices, activation, config, interpret):
  """The forward with s in bucket order (`expert_buckets`), y token-centric."""
  buckets = expert_tables.bucket(indices, num_experts=up.shape[0], d=x.shape[1],
                                 config=config.tables, interpret=interpret)
  s = expert_buckets.bucket_scores(x, up, buckets, indices.shape[1], config=config.scores,
                                   interpret=interpret)
  valid = reference.valid_ids(indices, up.shape[0])[0]
  act = reference.ACTIVATIONS[activation](s)
  a = jnp.where(valid, act * weights.astype(jnp.float32), 0.0)
  y = expert_tokens.pair_combine(a, down, indices, out_dtype=x.dtype, config=config.forward,
                                 interpret=interpret)
  return y, (x, up, down, weights, indices, s, buckets)


def _token_side(dy, up, down, weights, indices, s, buckets, activation, config, interpret):
  """dx, dweights and the per-pair ds, a (`expert_tokens.token_backward`'s outputs); with
  `buckets`, da in bucket order and dx by `pair_combine` instead of the fused kernel."""
  if buckets is None:
    return expert_tokens.token_backward(dy, up, down, weights, indices, s,
                                        activation=activation, config=config.backward,
                                        interpret=interpret)
  da = expert_buckets.bucket_scores(dy, down, buckets, indices.shape[1],
                                    config=config.scores, interpret=interpret)
  valid = reference.valid_ids(indices, up.shape[0])[0]
  dweights, ds, a = expert_tokens.pair_coefficients(da, weights.astype(jnp.float32), s, valid,
                                                    activation)
  dx = expert_tokens.pair_combine(ds, up, indices, out_dtype=dy.dtype, config=config.backward,
                                  interpret=interpret)
  return dx, dweights.astype(weights.dtype), ds, a


def _bwd(activation, config, interpret, residuals, dy):
  x, up, down, weights, indices, s, buckets = residuals
  dx, dweights, ds, a = _token_side(dy, up, down, weights, indices, s, buckets, activation,
                                    config, interpret)
  dup, ddown = expert_tables.table_gradients(
      x, dy, indices, ds, a, num_experts=up.shape[0], up_dtype=up.dtype,
      down_dtype=down.dtype, config=config.tables, interpret=interpret, buckets=buckets)
  return dx, dup, ddown, dweights, None


_atomic_experts.defvjp(_fwd, _bwd)


def atomic_experts(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                   indices: jax.Array, *, activation: str = "silu",
                   config: ExpertConfig = ExpertConfig(),
                   interpret: bool | None = None, unique_indices: bool = False) -> jax.Array:
  """`y_t = sum_k act(<x_t, up[e_tk]>) * weights_tk * down[e_tk]`, (T, d) in x.dtype.

  Same contract as `omnimoe.ops.atomic_experts` (which validates inputs); ids outside
  [0, N) contribute nothing. Differentiable in x, up, down and weights, in reverse mode to
  second order: the kernels compute first-order gradients, the reference's autodiff the
  second (`second_order.by_reference`); forward mode (jax.jvp) is not defined for a
  custom VJP. `config.path` picks the token-centric kernels here, the dense-regime GEMMs
  of `expert_dense` or the expert-line kernels of `expert_lines` ("auto": `choose_path` on
  T, k and N).
  `unique_indices` (no token lists an expert twice) lets the dense path store its grids'
  pairs instead of adding them; the other paths need no such promise.
  """
  if x.shape[0] == 0 or indices.shape[1] == 0:  # no pairs: the kernels have no grid
    return jnp.zeros(x.shape, x.dtype)
  interpret = common.resolve_interpret(interpret)
  op = second_order.by_reference(
      lambda *a: _first_order(*a, activation, config, interpret, unique_indices),
      lambda *a: reference.atomic_experts(*a, activation), num_diff=4)
  return op(x, up, down, weights, indices)


def _first_order(x, up, down, weights, indices, activation, config, interpret,
                 unique_indices):
  """The op on the path `config` picks; its gradients are the kernels' (first order)."""
  path = config.path
  if path == "auto":
    path = choose_path(x.shape[0], indices.shape[1], up.shape[0])
  if path == "dense":
    return expert_dense.atomic_experts_dense(x, up, down, weights, indices,
                                             activation=activation, config=config.dense,
                                             unique_indices=unique_indices)
  if path == "lines":
    return expert_lines.atomic_experts_lines(x, up, down, weights, indices,
                                             activation=activation, config=config.lines,
                                             interpret=interpret)
  return _atomic_experts(x, up, down, weights, indices, activation, config, interpret)
