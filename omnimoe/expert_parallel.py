"""Atomic experts with the tables U, V sharded along d across devices.

  split_atomic_experts(x, up, down, weights, indices, *, activation, impl, reduce_axes)
  sharded_atomic_experts(x, up, down, weights, indices, *, mesh, table_axes, batch_axes,
                         activation, impl)
  layout_from_rules(mesh=None) -> TableLayout | None   (what AtomicExpertBank uses)

Reference: `omnimoe.reference.atomic_experts` (values) and its autodiff (gradients).

Why d, not N (DESIGN.md section 5). The tables are most of the model (configs/gpu.py:
2 x 65536 x 1024 per layer, 8 layers, 1.07 B of its 1.2 B parameters) and a pallas_call is
not partitionable by XLA, so under a plain jit every device would hold, gather and update
whole tables. Splitting the rows N (classic expert parallelism) sends every (token,
expert) pair to the device that owns the expert: a data-dependent all-to-all of T k rows
with capacity limits or padding. Splitting the columns d keeps every expert on every
device, each holding a d-slice of it, and needs no routing-dependent traffic:

  forward   x (T, d), batch-sharded, goes through one all_to_all over the axes that split
            both the batch and the tables: each device then holds all tokens of its group
            (the devices that share a data coordinate) for its own d-slice;
            s_part = <x[:, slice], U[e, slice]> for every pair (`pair_scores`);
            ONE all-reduce (psum) of the (T, k) float32 scores over the table axes;
            a = act(s) * w;  y[:, slice] = sum_k a V[e, slice] (`pair_combine`);
            y goes back to batch sharding by the inverse all_to_all.
  backward  da_part = <dy[:, slice], V[e, slice]>, ONE psum -> da, ds = da w act'(s);
            dx[:, slice] = sum_k ds U[e, slice];
            dU[:, slice], dV[:, slice]: local segment sums over the group's pairs;
            dweights = da_part act(s), the slices' parts added by the shard_map
            transpose (a second (T, k) psum; the weights are replicated over the slices).

No (N, d) table gradient is all-reduced across the table axes: each device owns its
slice and its gradient. Data parallelism (tables replicated) all-reduces 2 N d floats per
layer per step; for configs/gpu.py that is 2 x 65536 x 1024 = 134 M floats per layer,
1.07 G floats (4.3 GB in float32) per step over 8 layers, which a ring all-reduce makes
each of 2 GPUs send and receive once (~10 ms at 450 GB/s of NVLink per direction, ~90 ms
at 50 GB/s of PCIe, next to a 0.20 s one-GPU step), and every GPU keeps whole tables,
their gradients and both Adam moments (17 GB). Split along d over P devices, a layer's
step moves per device, at T = 16384 tokens (batch 16 x 1024), k = 32, bf16, P = 2 (mesh
fsdp = 2): three (T, k) float32 psums (2 MB each), the (T, k) weights and ids gathered
once (2 MB), and four all_to_alls of half a (T / P, d) block (x, y, dy, dx: 8 MB each):
about 42 MB, 0.34 GB per step, and each device holds 1/P of the tables and their
optimizer state. (Computed from the shapes, not measured.) A `data` axis, over which the
tables are replicated, still all-reduces the table gradients over that axis alone, the
device's 1/P slice of them.

The expert op is split into its two halves, with the reduction of the scores between
them, in one custom VJP (`split_atomic_experts`) parameterised by the axes to psum over:
none on one device, the table axes inside `jax.shard_map`. The halves are the plain-jnp
`reference.pair_scores` / `pair_combine` (impl "xla"; their transposes give dU, dV) or the
Pallas kernels `expert_tokens.pair_scores` / `pair_combine` with
`expert_tables.table_gradients` (impl "pallas"). The fused one-device op
(`omnimoe.pallas.expert_ops.atomic_experts`) stays the default where nothing is sharded.

Layout conventions (checked, ValueError otherwise): `table_axes` = C + S and
`batch_axes` = G + S, where S are the axes that split both (all_to_all over them), C those
that split only the tables (x enters already cut to its C-slice of d, which costs nothing:
x is replicated over C) and G those that split only the batch (the tables are replicated
over G, so their gradients are summed over G). `omnimoe.sharding.RULES` give
C = (tensor,), S = (fsdp,), G = (data,).

Equivalent JAX code (one device of a mesh, its group's tokens, its slice of d):
  s = psum(einsum("td,tkd->tk", x_slice, up_slice[idx]), table_axes)
  y_slice = einsum("tk,tkd->td", act(s) * w * valid, down_slice[idx])
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from omnimoe import ops, reference, sharding
from omnimoe.pallas import common, expert_ops, expert_tables, expert_tokens


# ----------------------------------------------------------------------------------------
# The op in two halves, one custom VJP.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Pairs:
  """One implementation of the halves: scores (vec, table, ids) -> (T, k) float32;
  combine (coef, table, ids, dtype) -> (T, d); tables (x, dy, ids, ds, a, up, down) -> dU, dV."""
  scores: Callable
  combine: Callable
  tables: Callable


def _xla_tables(x, dy, indices, ds, a, up, down):
  """dU, dV as the transposes of the reference halves (scatter-adds of ds x and a dy):
  the gradients of <ds, pair_scores(x, U)> in U and of <dy, pair_combine(a, V)> in V."""
  du = jax.grad(lambda u: jnp.sum(ds * reference.pair_scores(x, u, indices)))(up)
  dv = jax.grad(lambda v: jnp.sum(dy * reference.pair_combine(a, v, indices)))(down)
  return du, dv


def _pairs(impl: str, interpret: bool) -> _Pairs:
  if impl == "xla":
    return _Pairs(reference.pair_scores,
                  lambda c, t, i, dtype: reference.pair_combine(c, t, i).astype(dtype),
                  _xla_tables)
  config = expert_ops.ExpertConfig()
  return _Pairs(
      functools.partial(expert_tokens.pair_scores, config=config.forward, interpret=interpret),
      lambda c, t, i, dtype: expert_tokens.pair_combine(
          c, t, i, out_dtype=dtype, config=config.forward, interpret=interpret),
      lambda x, dy, i, ds, a, up, down: expert_tables.table_gradients(
          x, dy, i, ds, a, num_experts=up.shape[0], up_dtype=up.dtype,
          down_dtype=down.dtype, config=config.tables, interpret=interpret))


def _reduce(partial_scores, axes: tuple[str, ...]):
  """The one collective of each direction: partial sums over d-slices -> full scores."""
  return lax.psum(partial_scores, axes) if axes else partial_scores


def _coefficients(s, weights, indices, num_experts: int, activation: str):
  """act(s), act'(s), the routing weights (float32) and the valid-pair mask."""
  act, act_grad = common.activation_with_grad(activation, s)
  valid = (indices >= 0) & (indices < num_experts)
  return act, act_grad, weights.astype(jnp.float32), valid


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _split(x, up, down, weights, indices, activation, impl, interpret, reduce_axes):
  return _split_fwd(x, up, down, weights, indices, activation, impl, interpret,
                    reduce_axes)[0]


def _split_fwd(x, up, down, weights, indices, activation, impl, interpret, reduce_axes):
  pairs = _pairs(impl, interpret)
  s = _reduce(pairs.scores(x, up, indices), reduce_axes)
  act, _, w, valid = _coefficients(s, weights, indices, up.shape[0], activation)
  y = pairs.combine(jnp.where(valid, act * w, 0.0), down, indices, x.dtype)
  return y, (x, up, down, weights, indices, s)


def _split_bwd(activation, impl, interpret, reduce_axes, residuals, dy):
  x, up, down, weights, indices, s = residuals
  pairs = _pairs(impl, interpret)
  da_part = pairs.scores(dy, down, indices)
  da = _reduce(da_part, reduce_axes)
  act, act_grad, w, valid = _coefficients(s, weights, indices, up.shape[0], activation)
  # dweights from this slice's part of da: the weights enter `sharded_atomic_experts`
  # replicated over the table axes, and the transpose of its shard_map (check_vma=False)
  # adds the cotangents of a replicated input over the axes it is replicated on.
  dweights = jnp.where(valid, da_part * act, 0.0).astype(weights.dtype)
  ds = jnp.where(valid, da * w * act_grad, 0.0)
  dx = pairs.combine(ds, up, indices, x.dtype)
  dup, ddown = pairs.tables(x, dy, indices, ds, jnp.where(valid, act * w, 0.0), up, down)
  return dx, dup, ddown, dweights, None


_split.defvjp(_split_fwd, _split_bwd)


def _check_inputs(x, up, down, weights, indices, activation: str) -> None:
  """`ops.atomic_experts`' contract, for the scalar activations only; ids outside [0, N)
  are masked, not refused."""
  if activation not in reference.ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(reference.ACTIVATIONS)} (a scalar "
                     f"activation; 'swiglu' runs through omnimoe.ops), got {activation!r}")
  ops.check_expert_inputs(x, up, down, weights, indices, activation, check_ids=False)


def split_atomic_experts(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                         indices: jax.Array, *, activation: str = "silu",
                         impl: str | None = None, reduce_axes: tuple[str, ...] = (),
                         interpret: bool | None = None) -> jax.Array:
  """The expert op as `pair_scores`, psum of the scores over `reduce_axes`, `pair_combine`.

  With `reduce_axes=()` it is `omnimoe.ops.atomic_experts` (same contract: (T, d) in
  x.dtype, float32 sums, ids outside [0, N) add nothing, differentiable in x, up, down,
  weights). Inside `jax.shard_map`, with x, up, down holding one slice of d and
  `reduce_axes` the mesh axes that split d, it is that slice of the op (and of the
  gradients of x, up, down; dweights whole).
  """
  _check_inputs(x, up, down, weights, indices, activation)
  impl, interpret = ops.resolve_impl(impl), common.resolve_interpret(interpret)
  return _split(x, up, down, weights, indices, activation, impl, interpret,
                tuple(reduce_axes))


# ----------------------------------------------------------------------------------------
# The sharded op.
# ----------------------------------------------------------------------------------------

def _axes(axes) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a name, or a tuple of names) as a tuple of names."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class TableLayout:
  """Where the tables and tokens live: a mesh (concrete or abstract), the mesh axes that
  split d of U, V (`table_axes`) and those that split the tokens (`batch_axes`)."""
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
  table_axes: tuple[str, ...]
  batch_axes: tuple[str, ...]

  def __post_init__(self):
    table, batch = _axes(self.table_axes), _axes(self.batch_axes)
    object.__setattr__(self, "table_axes", table)
    object.__setattr__(self, "batch_axes", batch)
    unknown = sorted(set(table + batch) - set(self.mesh.axis_names))
    if unknown:
      raise ValueError(f"axes {unknown} are not axes of the mesh {self.mesh.axis_names}")
    shared = self.shared_axes
    if table[len(table) - len(shared):] != shared or batch[len(batch) - len(shared):] != shared:
      raise ValueError(
          f"table_axes={table} and batch_axes={batch}: the axes that split both {shared} "
          "must come last in both, in the same order (the others of table_axes are cut "
          "locally, the shared ones take one all_to_all)")

  @property
  def shared_axes(self) -> tuple[str, ...]:
    """S: the axes that split both d and the tokens (the all_to_all runs over them)."""
    return tuple(a for a in self.table_axes if a in self.batch_axes)

  def size(self, axes) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  def fits(self, tokens: int, d: int) -> bool:
    """Whether T tokens and d columns split evenly over the batch and table axes."""
    return tokens % self.size(self.batch_axes) == 0 and d % self.size(self.table_axes) == 0


def layout_from_rules(mesh=None) -> TableLayout | None:
  """The layout `omnimoe.sharding.RULES` give the expert tables and the batch on `mesh`
  (default: the current mesh, `jax.sharding.get_abstract_mesh()`, which
  `sharding.on_mesh` sets). None without a mesh of more than one device that has the
  axes the rules name: then the plain op runs.

  Also a data-only mesh gets a layout (no table axis, no collective in the op): a
  pallas_call under a plain jit would otherwise run on the all-gathered batch.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or mesh.size == 1:
    return None
  table = _axes(sharding.mesh_axes(("experts", "expert_embed"))[1])
  batch = _axes(sharding.mesh_axes(("batch",))[0])
  if not set(table + batch) <= set(mesh.axis_names):
    return None
  return TableLayout(mesh, table, batch)


def sharded_atomic_experts(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                           indices: jax.Array, *, mesh, table_axes, batch_axes,
                           activation: str = "silu", impl: str | None = None,
                           interpret: bool | None = None) -> jax.Array:
  """`omnimoe.ops.atomic_experts` with up, down split along d over `table_axes` of `mesh`
  and x, weights, indices (and y) split along T over `batch_axes` (see the module
  docstring). Call it under `jax.jit` or eagerly; the arrays may have any sharding (they
  are moved to these layouts), but tables already d-sharded this way move nothing.

  Args:
    mesh: a `jax.sharding.Mesh`, or the abstract mesh under jit.
    table_axes, batch_axes: mesh axis names (a name, a tuple, or None), the axes that
      split both last and in the same order in both.
  """
  layout = TableLayout(mesh, table_axes, batch_axes)
  _check_inputs(x, up, down, weights, indices, activation)
  if not layout.fits(x.shape[0], x.shape[1]):
    raise ValueError(
        f"x {x.shape}: T must be divisible by the batch axes {layout.batch_axes} "
        f"(size {layout.size(layout.batch_axes)}) and d by the table axes "
        f"{layout.table_axes} (size {layout.size(layout.table_axes)})")
  impl, interpret = ops.resolve_impl(impl), common.resolve_interpret(interpret)
  # Only axes of several devices go manual: an axis of one splits nothing, and would
  # still cost an all-reduce (of one device) in the transpose of the shard_map.
  several = lambda axes: tuple(a for a in axes if layout.mesh.shape[a] > 1)
  layout = TableLayout(layout.mesh, several(layout.table_axes), several(layout.batch_axes))
  manual = set(layout.table_axes + layout.batch_axes)
  if not manual:
    return _split(x, up, down, weights, indices, activation, impl, interpret, ())
  shared = layout.shared_axes
  cols = layout.table_axes[:len(layout.table_axes) - len(shared)]
  group = layout.batch_axes[:len(layout.batch_axes) - len(shared)]

  def body(x, up, down, weights, indices):
    if shared:  # (T/|B|, d/|C|) -> all tokens of the group, own slice: (T/|G|, d/|C+S|)
      x = lax.all_to_all(x, shared, 1, 0, tiled=True)
    y = _split(x, up, down, weights, indices, activation, impl, interpret,
               layout.table_axes)
    return lax.all_to_all(y, shared, 0, 1, tiled=True) if shared else y

  # Autodiff conventions of shard_map with check_vma=False (the Pallas kernels' outputs
  # carry no varying-axes types): the cotangent of an input replicated over some axes is
  # summed over them. So dU, dV (tables replicated over G) add up the groups' parts, and
  # dweights (replicated over the table axes) the d-slices' parts.
  spec = lambda *dims: P(*(d or None for d in dims))
  rows = spec(layout.batch_axes, cols)
  table = spec(None, layout.table_axes)
  pairs = spec(group, None)  # the (T, k) weights and ids: gathered over S by XLA (small)
  return jax.shard_map(body, mesh=layout.mesh, in_specs=(rows, table, table, pairs, pairs),
                       out_specs=rows, axis_names=manual,
                       check_vma=False)(x, up, down, weights, indices)
