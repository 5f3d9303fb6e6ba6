"""Cartesian product router: two small gates score an n x n grid of N = n * n experts.

Expert e = i * n + j scores `lx[i] + ly[j]` with `lx = log_softmax(norm(x Rx))`,
`ly = log_softmax(norm(x Ry))`, i.e. the log of `p_x(i) p_y(j)`; each token keeps its exact
top-k (`omnimoe.ops.cartesian_topk`, product-key search).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe import ops

# PyTorch BatchNorm1d's defaults (momentum 0.1 on the new value), as in the released code.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def expert_load(indices: jax.Array, num_experts: int) -> jax.Array:
  """(N,) float32 count of (token, expert) pairs routed to each expert (a scatter-add).

  Under jit an unused load is dead code and costs nothing.
  """
  return jnp.zeros((num_experts,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def grid_entropy(lx: jax.Array, ly: jax.Array) -> jax.Array:
  """Mean over tokens of the entropy (nats) of the full routing distribution over N experts.

  `p(i, j) = p_x(i) p_y(j)` factorises, so its entropy is exactly `H(p_x) + H(p_y)`; the
  maximum is log N (uniform routing). Computed before top-k, so it is the same for both
  routing-weight modes.
  """
  def axis_entropy(logp):
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.mean(axis_entropy(lx) + axis_entropy(ly))


def select_pairs(lx: jax.Array, ly: jax.Array, k: int, routing_weights: str,
                 impl: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Top-k experts of the grid `lx[:, i] + ly[:, j]` and their routing weights.

  Gradients reach the gates through the op's scores on either implementation (the
  Pallas kernels only select; their custom JVP gathers the tangents at the chosen ids).
  A token's k experts are a set (the expert bank sums over them), so the op is asked for
  them unsorted: for k above the fused kernel's (`router_topk.MAX_KERNEL_K`) the Pallas
  path then skips its final (T, k) sort.

  Args:
    lx, ly: (T, n) row and column log-probabilities (float32).
    routing_weights: 'exp' (g = exp(score) = p_x(i) p_y(j), the released code) or
      'softmax' (softmax over the k selected scores, the paper).
  Returns:
    weights (T, k) float32, indices (T, k) int32 (flat ids i * n + j), a token's k in the
    implementation's order (best first for k <= MAX_KERNEL_K and on XLA).
  """
  scores, indices = ops.cartesian_topk(lx, ly, k, sorted=False, impl=impl)
  if routing_weights == "exp":
    weights = jnp.exp(scores)
  else:
    weights = jax.nn.softmax(scores, axis=-1)
  return weights, indices


# The rule path's grid passes cost less as k falls (their rows below the top-k's staircase
# cost a store of zeros), the pairs path's emit and scatters grow with k, so the rule wins
# from a density up. Measured, one H100, N = 320^2, d = 1024, the whole FFN
# (experiments/bench_rule.py, RESULTS.md, v22 and v23), pairs against rule (the ranked row
# walk), fwd+bwd ms: T = 4096: k = 768 7.846 / 7.969, k = 1024 8.152 / 7.897, k = 2048
# 8.310 / 8.188, k = 4096 9.330 / 8.503; T = 1024: k = 1024 2.217 / 2.255, k = 2048 2.291 /
# 2.249; T = 16,384 (S one GEMM for all token blocks, v23): k = 2048 40.110 / 35.171,
# k = 4096 45.474 / 36.175. The rule wins every forward timed (k >= 512) and from 2 % of
# N every fwd+bwd timed. Those T = 16,384 rows ran in four token blocks; since one block
# holds them (`DenseConfig.max_block_elements`, v24) both paths got faster (pairs k = 1024
# 37.6 -> 31.7, rule k = 4096 37.1 -> 33.5) and the two have not been A/B'd there again.
RULE_MIN_DENSITY = 2048 / 102_400


def routes_by_rule(tokens: int, k: int, num_experts: int, routing_weights: str,
                   activation: str, impl: str | None) -> bool:
  """Whether an OmniMoE layer routes by the top-k's membership rule, (theta, cut) a token
  and no pairs (`select_rule`, `omnimoe.pallas.expert_rule`), rather than by pairs: on the
  Pallas path, with routing weights 'exp' and a scalar activation, for k in the threshold
  router's range (above the fused kernel's `router_topk.MAX_KERNEL_K`), in the dense
  regime (`expert_ops.choose_path`) and from `RULE_MIN_DENSITY` of the experts a token up,
  where it beat the pairs path forward and forward+backward (the figures above)."""
  if ops.resolve_impl(impl) != "pallas" or routing_weights != "exp" or activation == "swiglu":
    return False
  from omnimoe.pallas import expert_ops, router_topk
  return (k > router_topk.MAX_KERNEL_K and k >= RULE_MIN_DENSITY * num_experts
          and expert_ops.choose_path(tokens, k, num_experts) == "dense")


def select_rule(lx: jax.Array, ly: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The top-k as a rule, (theta (T,) float32, cut (T,) int32): expert e = i n_y + j is
  routed to token t iff fl32(lx[t, i] + ly[t, j]) > theta[t], or equals it and e <= cut[t]
  (`omnimoe.pallas.router_threshold.threshold`; a selection, no gradient)."""
  from omnimoe.pallas import router_threshold
  return router_threshold.threshold(lx, ly, k)


def rule_load(lx: jax.Array, ly: jax.Array, theta: jax.Array, cut: jax.Array) -> jax.Array:
  """`expert_load` of the rule's routing: (N,) float32, tokens routed to each expert (an
  O(T N) reduction of the rule's mask; under jit an unused load costs nothing)."""
  from omnimoe.pallas import expert_rule
  return expert_rule.routed_mask(lx, ly, theta, cut).sum(0, dtype=jnp.float32)


class CartesianRouter(nn.Module):
  """Routes each token to k of N = n * n atomic experts.

  Gates `Rx, Ry: (d, n)` (no bias); the GEMM runs on `dtype` operands like the rest of
  the layer, but its logits stay float32 (`ops.gate_logits`), since top-k selection is
  sensitive to rounding (with `dtype` float32 on GPU, JAX's default matmul precision runs
  the GEMM in TF32, as everywhere else in the model; wrap the call in
  `jax.default_matmul_precision("highest")` for full float32 products). With
  `norm='batchnorm'` each axis is normalised by BatchNorm without scale or bias (batch
  statistics when `train`, running statistics in collection 'batch_stats' otherwise), as
  in the released code. Note that batch statistics mix tokens of the whole batch, so in
  training a token's routing depends (slightly) on other and later tokens; evaluation
  with running statistics is strictly per token.

  Returns (weights (T, k) float32, indices (T, k) int32, stats) with
  stats = {'entropy': scalar, see `grid_entropy`; 'load': (N,) float32, see `expert_load`}.
  `log_probs` alone gives (lx, ly), for routing by the rule (`routes_by_rule`).
  """
  num_experts: int
  top_k: int
  routing_weights: str = "exp"
  norm: str = "batchnorm"
  impl: str | None = None
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  @nn.compact
  def log_probs(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """(lx, ly) (T, n) float32: the gates, normalised, log-softmax."""
    n = math.isqrt(self.num_experts)
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "router"))
    log_probs = []
    for axis in ("x", "y"):
      gate = self.param(f"gate_{axis}", init, (x.shape[-1], n), self.param_dtype)
      logits = ops.gate_logits(x, gate, self.dtype)
      if self.norm == "batchnorm":
        logits = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False,
                              momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=jnp.float32,
                              name=f"norm_{axis}")(logits)
      log_probs.append(jax.nn.log_softmax(logits, axis=-1))
    return tuple(log_probs)

  def __call__(self, x: jax.Array, *, train: bool):
    lx, ly = self.log_probs(x, train=train)
    weights, indices = select_pairs(lx, ly, self.top_k, self.routing_weights, self.impl)
    stats = {"entropy": grid_entropy(lx, ly), "load": expert_load(indices, self.num_experts)}
    return weights, indices, stats
