"""Feed-forward blocks: SwiGLU MLP, the OmniMoE layer, and the baselines' FFNs.

Every FFN block maps x (..., d) to (y (..., d), aux) with
  aux['aux_loss']        scalar float32 to add to the loss (0.0 where there is none),
  aux['expert_load']     (N,) float32 count of routed (token, expert) pairs (routed kinds),
  aux['router_entropy']  scalar float32, mean over tokens (routed kinds; see each block).
`ffn_from_config` builds the block chosen by `model.ffn`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from omnimoe import config as config_lib
from omnimoe import experts as experts_lib
from omnimoe import reference
from omnimoe import router as router_lib
from omnimoe.experts import BANK_NAME, AtomicExpertBank


def no_aux() -> dict:
  """The aux dict of a block without routing."""
  return {"aux_loss": jnp.zeros((), jnp.float32)}


def routed_aux(load: jax.Array, entropy: jax.Array, aux_loss=0.0) -> dict:
  """The aux dict of a routed block."""
  return {"aux_loss": jnp.asarray(aux_loss, jnp.float32), "expert_load": load,
          "router_entropy": entropy.astype(jnp.float32)}


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


class SharedMLP(nn.Module):
  """SwiGLU: `(silu(x Wg) * (x Wu)) Wd`, no biases.

  Wg and Wu are one (d, 2, hidden) parameter `gate_up` (gate first), so x meets them in one
  GEMM with nothing to concatenate: as two parameters, XLA's dot merger joins the two
  products through a concatenation of the weights and, in the backward, of the two
  gradients (T x 2 hidden), which cost the MLP's fwd+bwd 17 % on one H100
  (experiments/RESULTS.md, "One parameter for projections that share an input").
  Tensor parallelism splits `hidden`, so each device keeps its gate and up columns together.
  """
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.lecun_normal()

    def dense(features, names, name):
      return nn.DenseGeneral(features, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=nn.with_logical_partitioning(init, names))

    h = reference.swiglu(dense((2, self.hidden_dim), ("embed", None, "mlp"), "gate_up")(x))
    return dense(x.shape[-1], ("mlp", "embed"), "down")(h)


class DenseFFN(nn.Module):
  """The dense baseline: one SwiGLU MLP of width `hidden_dim`."""
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    del train  # no state
    return SharedMLP(self.hidden_dim, self.dtype, self.param_dtype, name="mlp")(x), no_aux()


class OmniMoELayer(nn.Module):
  """`y = SharedMLP(x) + AtomicExpertBank(x, CartesianRouter(x))`.

  The router hands the bank pairs, or, where `router.routes_by_rule` (Pallas, k in the
  thousands, the dense regime), the top-k as a rule (theta, cut) and no pairs.

  aux['router_entropy'] is the entropy of the routing distribution over all N experts
  (`router.grid_entropy`); no auxiliary loss (neither the paper nor the released code has one).
  """
  num_experts: int
  top_k: int
  shared_ffn_dim: int
  activation: str = "silu"
  routing_weights: str = "exp"
  router_norm: str = "batchnorm"
  impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    tokens = _flatten(x)
    router = router_lib.CartesianRouter(
        self.num_experts, self.top_k, self.routing_weights, self.router_norm, self.impl,
        self.param_dtype, self.dtype, name="router")
    bank = AtomicExpertBank(self.num_experts, self.activation, self.impl, self.dtype,
                            self.param_dtype, unique_indices=True,  # one top-k per token
                            name=BANK_NAME)
    if self._routes_by_rule(tokens.shape):
      lx, ly = router.log_probs(tokens, train=train)
      rule = (lx, ly, *router_lib.select_rule(lx, ly, self.top_k))
      routed = bank(tokens, rule=rule)
      stats = {"load": router_lib.rule_load(*rule),
               "entropy": router_lib.grid_entropy(lx, ly)}
    else:
      weights, indices, stats = router(tokens, train=train)
      routed = bank(tokens, weights, indices)
    shared = SharedMLP(self.shared_ffn_dim, self.dtype, self.param_dtype, name="shared_mlp")(x)
    return shared + routed.reshape(x.shape), routed_aux(stats["load"], stats["entropy"])

  def _routes_by_rule(self, shape) -> bool:
    """`router.routes_by_rule`, on one device (the expert-parallel op takes pairs)."""
    tokens, d = shape
    return (router_lib.routes_by_rule(tokens, self.top_k, self.num_experts,
                                      self.routing_weights, self.activation, self.impl)
            and experts_lib.sharded_layout(tokens, d, self.activation) is None)


class CoarseMoE(nn.Module):
  """DeepSeekMoE-style baseline: `num_shared` always-on SwiGLU experts plus `num_experts`
  routed SwiGLU experts of width `expert_dim`, softmax router (float32), top-k.

  Gate values are the softmax probabilities of the selected experts (not renormalised, as
  in DeepSeekMoE). The shared experts are fused into one SwiGLU of width
  `num_shared * expert_dim` (the same function). Load-balancing loss (Switch/DeepSeek):
  `aux_loss_coef * E * sum_i f_i P_i`, f_i the fraction of the T*k routed pairs sent to
  expert i, P_i its mean router probability; 1 * coef at perfect balance.

  Dispatch is dense: every expert runs on every token and the outputs are combined with
  the (T, E) gate matrix, zero off the top-k. It is exact (no capacity, no dropped tokens),
  needs no sort or gather, and is a few batched matmuls; it spends E/k times the active
  FLOPs, which is fine for the small baselines this is for (E of 8-64). A per-token gather
  of expert weights would move (T, k, d, expert_dim) weights, far more memory traffic.

  aux['router_entropy'] is the mean over tokens of the entropy of the router softmax.
  """
  num_experts: int
  top_k: int
  num_shared: int
  expert_dim: int
  aux_loss_coef: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    del train  # no state
    e, k, h = self.num_experts, self.top_k, self.expert_dim
    tokens = _flatten(x)
    d = tokens.shape[-1]

    router_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               ("embed", "router"))
    gate = self.param("router", router_init, (d, e), self.param_dtype)
    logits = tokens.astype(jnp.float32) @ gate.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, indices = jax.lax.top_k(probs, k)
    combine = jnp.sum(jax.nn.one_hot(indices, e, dtype=jnp.float32) * top_probs[..., None],
                      axis=1)  # (T, E)

    def expert_param(name, shape, names):
      init = nn.initializers.lecun_normal(in_axis=1, out_axis=tuple(range(2, len(shape))),
                                          batch_axis=(0,))
      w = self.param(name, nn.with_logical_partitioning(init, names), shape, self.param_dtype)
      return w.astype(self.dtype)

    # gate and up as one parameter, as in SharedMLP
    w_gate_up = expert_param("w_gate_up", (e, d, 2, h), ("moe_experts", "embed", None, "mlp"))
    w_down = expert_param("w_down", (e, h, d), ("moe_experts", "mlp", "embed"))
    hidden = reference.swiglu(jnp.einsum("td,edch->tech", tokens.astype(self.dtype),
                                         w_gate_up))
    hidden = hidden * combine[..., None].astype(self.dtype)
    y = jnp.einsum("teh,ehd->td", hidden, w_down).reshape(x.shape)
    if self.num_shared:
      y = y + SharedMLP(self.num_shared * h, self.dtype, self.param_dtype,
                        name="shared_mlp")(x)

    load = router_lib.expert_load(indices, e)
    balance = e * jnp.sum(load / (tokens.shape[0] * k) * jnp.mean(probs, axis=0))
    entropy = jnp.mean(-jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return y, routed_aux(load, entropy, self.aux_loss_coef * balance)


class PEERLayer(nn.Module):
  """PEER baseline: product-key retrieval of single-neuron experts, `num_heads` heads.

  Each head has its own query projection (d -> key_dim); the query halves score two shared
  sub-key tables (stored (key_dim / 2, n), n = sqrt(N)), and the exact top-k of `s1[i] + s2[j]` is
  found by `ops.cartesian_topk` (on the log-softmax of each half, which shifts every grid
  score of a token by one constant, so the selection and the softmax over the k selected
  scores are PEER's). Experts `(u_e, v_e)` are shared by all heads; the heads' k-blocks are
  concatenated into one `ops.atomic_experts` call of H*k pairs per token, which is the sum
  of the per-head calls. No shared MLP; no query BatchNorm (PEER has one; left out).

  aux['router_entropy'] is the mean over tokens and heads of the entropy of the softmax
  over all N grid scores (`router.grid_entropy`).
  """
  num_experts: int
  top_k: int
  num_heads: int
  key_dim: int
  activation: str = "gelu"
  impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    del train  # no state
    n, half = math.isqrt(self.num_experts), self.key_dim // 2
    tokens = _flatten(x)
    t, d = tokens.shape
    query_init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    queries = self.param("query", nn.with_logical_partitioning(query_init,
                                                               ("embed", "heads", "head_dim")),
                         (d, self.num_heads, self.key_dim), self.param_dtype)
    q = jnp.einsum("td,dhk->thk", tokens.astype(jnp.float32), queries.astype(jnp.float32))
    q = q.reshape(t * self.num_heads, self.key_dim)
    key_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                            ("head_dim", "router"))
    log_probs = []
    for axis, q_half in (("x", q[:, :half]), ("y", q[:, half:])):
      keys = self.param(f"keys_{axis}", key_init, (half, n), self.param_dtype)
      log_probs.append(jax.nn.log_softmax(q_half @ keys.astype(jnp.float32), axis=-1))
    lx, ly = log_probs
    weights, indices = router_lib.select_pairs(lx, ly, self.top_k, "softmax", self.impl)
    weights = weights.reshape(t, self.num_heads * self.top_k)
    indices = indices.reshape(t, self.num_heads * self.top_k)
    # Heads share the tables, so two heads of a token may pick the same expert.
    y = AtomicExpertBank(self.num_experts, self.activation, self.impl, self.dtype,
                         self.param_dtype, unique_indices=self.num_heads == 1,
                         name=BANK_NAME)(tokens, weights, indices)
    load = router_lib.expert_load(indices, self.num_experts)
    return y.reshape(x.shape), routed_aux(load, router_lib.grid_entropy(lx, ly))


def ffn_from_config(cfg: ml_collections.ConfigDict, dtype, param_dtype, name: str) -> nn.Module:
  """The FFN block chosen by `cfg.ffn` (a validated model config)."""
  kind = cfg.ffn
  if kind == "dense":
    return DenseFFN(cfg.dense.ffn_dim, dtype, param_dtype, name=name)
  if kind == "omnimoe":
    c = cfg.omnimoe
    return OmniMoELayer(c.num_experts, c.top_k, c.shared_ffn_dim, c.activation,
                        c.routing_weights, c.router_norm, config_lib.resolve_impl(c.impl),
                        dtype, param_dtype, name=name)
  if kind == "coarse_moe":
    c = cfg.coarse_moe
    return CoarseMoE(c.num_experts, c.top_k, c.num_shared, c.expert_dim, c.aux_loss_coef,
                     dtype, param_dtype, name=name)
  c = cfg.peer
  return PEERLayer(c.num_experts, c.top_k, c.num_heads, c.key_dim, c.activation,
                   config_lib.resolve_impl(c.impl), dtype, param_dtype, name=name)

