"""Atomic expert bank: the tables U, V (N, d) and the dispatch to `omnimoe.ops` (one device)
or `omnimoe.expert_parallel` (a mesh of several: tables split along d)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe import expert_parallel, ops

BANK_NAME = "experts"  # the name every FFN layer gives its AtomicExpertBank


def cast_tables(num_pairs: int, num_experts: int) -> bool:
  """Whether to cast the (N, d) tables to the compute dtype before the op (True), or to
  hand the op the tables as stored (False), when the parameters are wider (float32 master
  weights, bf16 compute; the op takes mixed dtypes and accumulates in float32 either way).

  Bytes per table and fwd+bwd over d, P = T k pairs, float32 over bf16. Cast: read 4N,
  write 2N; two gather passes (forward, token backward) of 2P; a bf16 gradient 2N, which
  autodiff casts back (read 2N, write 4N, unless XLA fuses that into the optimizer):
  14N + 4P (6N + 4P fused). As stored: gathers of 4P twice, a float32 gradient 4N: 8P + 4N.
  As stored wins for P < 2.5 N (P < N / 2 fused); the rule takes P < N / 2, where the
  Pallas op's dense path also begins for large k (`expert_ops.choose_path`: it reads the
  whole tables, and float32 tables would make its grid GEMMs float32). At configs/gpu.py
  (P = 16384 x 32 = 8 N) it casts; at N = 2^20 with T = 4096, k = 32 (P = N / 8) it saves
  two casts of 4 GB tables and their gradients (experiments/RESULTS.md, "The Flax layer").
  Reading as stored is also more precise: dU, dV are never rounded to bf16.
  """
  return 2 * num_pairs >= num_experts


def sharded_layout(tokens: int, d: int, activation: str):
  """The expert-parallel layout the bank runs on (`expert_parallel.layout_from_rules`), or
  None: the plain op (no mesh of several devices, activation 'swiglu', or T or d that the
  mesh's axes do not divide)."""
  layout = expert_parallel.layout_from_rules()
  if activation == "swiglu" or layout is None or not layout.fits(tokens, d):
    return None
  return layout


class AtomicExpertBank(nn.Module):
  """`y_t = sum_k act(<x_t, U[e_tk]>) * g_tk * V[e_tk]` over N single-neuron experts.

  Initialisation: both tables N(0, 1/d). For U this keeps the scores `<x, U[e]>` O(1) for
  RMS-normalised inputs, where the activation is non-linear (PyTorch's Embedding default
  N(0, 1), used by the released code, makes them O(sqrt(d))). For V it gives each expert
  an output direction of about unit norm; since OmniMoE's routing weights of a token sum to
  at most 1, the routed branch starts small next to the shared MLP, like the down-scaled
  output projections of residual branches.

  `impl`: 'xla', 'pallas' or None (Pallas on GPU, XLA elsewhere), passed to the op.
  `unique_indices`: the caller promises that no token lists an expert twice (true of one
  top-k, as OmniMoE's router; not of PEER's heads, which share the tables), which lets the
  op store instead of add: `ops.atomic_experts`.
  Tables wider than the compute dtype (float32 master weights, bf16 compute) reach the op
  cast or as stored, whichever moves fewer bytes: `cast_tables`.
  With activation 'swiglu' (the paper's wording) the bank has a third table `gate`,
  initialised like U: `h = silu(<x, gate[e]>) * <x, U[e]>`.

  Devices: the tables are named ('experts', 'expert_embed'), which `omnimoe.sharding.RULES`
  split along d. Under a current mesh of several devices (`sharding.on_mesh` sets it for
  the train steps) the bank runs `expert_parallel.sharded_atomic_experts` on the layout
  the rules give (`expert_parallel.layout_from_rules`), so each device works on its d-slice and its
  batch group; with one device, no mesh, activation 'swiglu', or a token count that the
  batch axes do not divide (model.init traces a single sequence), it runs the plain
  `ops.atomic_experts`, which XLA partitions by itself for impl 'xla'.

  Routing: pairs (weights, indices), or `rule` = (lx, ly, theta, cut), the top-k as a
  membership rule with weights exp(lx[i] + ly[j]) (`router.routes_by_rule` says when;
  `omnimoe.pallas.expert_rule`, one device).
  """
  num_experts: int
  activation: str = "silu"
  impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  unique_indices: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array | None = None,
               indices: jax.Array | None = None, *, rule=None) -> jax.Array:
    d = x.shape[-1]
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=d ** -0.5),
                                        ("experts", "expert_embed"))
    up = self.param("up", init, (self.num_experts, d), self.param_dtype)
    down = self.param("down", init, (self.num_experts, d), self.param_dtype)
    gate = None
    if self.activation == "swiglu":
      gate = self.param("gate", init, (self.num_experts, d), self.param_dtype)
    x = x.astype(self.dtype)
    if rule is not None:  # the dense regime: whole tables read, cast (`cast_tables`)
      from omnimoe.pallas import expert_rule
      return expert_rule.atomic_experts_rule(x, up.astype(self.dtype), down.astype(self.dtype),
                                             *rule, activation=self.activation)
    if cast_tables(x.shape[0] * indices.shape[1], self.num_experts):
      up, down, gate = (None if t is None else t.astype(self.dtype) for t in (up, down, gate))
    layout = sharded_layout(x.shape[0], d, self.activation)
    if layout is not None:
      return expert_parallel.sharded_atomic_experts(
          x, up, down, weights, indices, mesh=layout.mesh, table_axes=layout.table_axes,
          batch_axes=layout.batch_axes, activation=self.activation, impl=self.impl)
    return ops.atomic_experts(x, up, down, weights, indices, activation=self.activation,
                              gate=gate, impl=self.impl, unique_indices=self.unique_indices)
