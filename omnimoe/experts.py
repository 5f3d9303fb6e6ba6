"""Atomic expert bank: the tables U, V (N, d) and the dispatch to `omnimoe.ops` (one device)
or `omnimoe.expert_parallel` (a mesh of several: tables split along d)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe import expert_parallel, ops

BANK_NAME = "experts"  # the name every FFN layer gives its AtomicExpertBank


class AtomicExpertBank(nn.Module):
  """`y_t = sum_k act(<x_t, U[e_tk]>) * g_tk * V[e_tk]` over N single-neuron experts.

  Initialisation: both tables N(0, 1/d). For U this keeps the scores `<x, U[e]>` O(1) for
  RMS-normalised inputs, where the activation is non-linear (PyTorch's Embedding default
  N(0, 1), used by the released code, makes them O(sqrt(d))). For V it gives each expert
  an output direction of about unit norm; since the routing weights of a token sum to at
  most 1, the routed branch starts small next to the shared MLP, like the down-scaled
  output projections of residual branches.

  `impl`: 'xla', 'pallas' or None (Pallas on GPU, XLA elsewhere), passed to the op.
  With activation 'swiglu' (the paper's wording) the bank has a third table `gate`,
  initialised like U: `h = silu(<x, gate[e]>) * <x, U[e]>`.

  Devices: the tables are named ('experts', 'expert_embed'), which `omnimoe.sharding.RULES`
  split along d. Under a current mesh of several devices (`sharding.on_mesh` sets it for
  the train steps) the bank runs `expert_parallel.sharded_atomic_experts` on the layout
  the rules give (`expert_parallel.layout_from_rules`), so each device works on its d-slice and its
  batch group; with one device, no mesh, activation 'swiglu', or a token count that the
  batch axes do not divide (model.init traces a single sequence), it runs the plain
  `ops.atomic_experts`, which XLA partitions by itself for impl 'xla'.
  """
  num_experts: int
  activation: str = "silu"
  impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array, indices: jax.Array) -> jax.Array:
    d = x.shape[-1]
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=d ** -0.5),
                                        ("experts", "expert_embed"))
    up = self.param("up", init, (self.num_experts, d), self.param_dtype)
    down = self.param("down", init, (self.num_experts, d), self.param_dtype)
    gate = None
    if self.activation == "swiglu":
      gate = self.param("gate", init, (self.num_experts, d), self.param_dtype).astype(self.dtype)
    x, up, down = (a.astype(self.dtype) for a in (x, up, down))
    layout = expert_parallel.layout_from_rules()
    if gate is None and layout is not None and layout.fits(x.shape[0], d):
      return expert_parallel.sharded_atomic_experts(
          x, up, down, weights, indices, mesh=layout.mesh, table_axes=layout.table_axes,
          batch_axes=layout.batch_axes, activation=self.activation, impl=self.impl)
    # The router's top-k never repeats an expert within a token.
    return ops.atomic_experts(x, up, down, weights, indices, activation=self.activation,
                              gate=gate, impl=self.impl, unique_indices=True)
