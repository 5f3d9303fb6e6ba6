"""Mesh axes and partition rules: the one place that says where every array lives.

The mesh has three named axes: `data` (batch only), `fsdp` (batch, and parameters sharded
at rest, gathered on use) and `tensor` (weights split inside a matmul). Modules name the
axes of their parameters logically (`nn.with_logical_partitioning`); `RULES` maps those
names to mesh axes. Rules are tried in order and a mesh axis is used at most once per
array, so `moe_experts` takes `fsdp` before `embed` can, and such weights keep `embed` whole.

The atomic-expert tables U, V (N, d) (and their AdamW moments, which take the same rules)
are split along d over (tensor, fsdp) and replicated over data: each device holds a
d-slice of every expert, computes partial scores over its slice and all-reduces only the
(T, k) scores, and owns the gradient of its slice (`omnimoe.expert_parallel` says why,
with numbers; the rows N are never split). The axes that split only the tables (tensor)
come before the one that splits the batch too (fsdp): a token block's slice of d is then
cut locally and one all_to_all over fsdp gathers the group's tokens.

`on_mesh` runs a jitted function with its mesh as the current one (`jax.set_mesh`): jit
with Auto-axis shardings does not tell the traced code which mesh it runs on, and the
expert bank needs it for its `jax.shard_map` (`expert_parallel.layout_from_rules`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from omnimoe.config import ConfigError

AXES = ("data", "fsdp", "tensor")

RULES = (
    ("batch", ("data", "fsdp")),
    ("moe_experts", "fsdp"),  # coarse MoE experts: spread across fsdp
    ("experts", None),  # rows N of the atomic-expert tables U, V: whole on every device
    ("expert_embed", ("tensor", "fsdp")),  # their d axis: a d-slice of every expert each
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("router", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one of them may be -1 for the rest of the devices."""
  sizes = [mesh_cfg[a] for a in AXES]
  for axis, size in zip(AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis}={size!r}: must be a positive integer or -1")
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh={dict(zip(AXES, sizes))}: at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      axis = AXES[sizes.index(-1)]
      raise ConfigError(f"mesh.{axis}=-1: the other axes use {fixed} devices, which does not "
                        f"divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh={dict(zip(AXES, sizes))}: uses {fixed} devices, but there are "
                      f"{num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The global mesh from `config.mesh`, with Auto axes (the same on JAX 0.10 and 0.11)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def on_mesh(fn, mesh: jax.sharding.Mesh):
  """`fn` (a jitted function) called (and so traced) with `mesh` as the current mesh,
  scoped to the call (a caller that already set it, e.g. to trace `fn` inside
  `jax.make_jaxpr`, keeps it); `.lower(...)` likewise, to inspect the compiled program."""
  def scoped(method):
    def call(*args, **kwargs):
      if jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
        return method(*args, **kwargs)
      with jax.set_mesh(mesh):
        return method(*args, **kwargs)
    return call

  call = scoped(fn)
  call.lower = scoped(fn.lower)
  return call


def mesh_axes(logical_names) -> PartitionSpec:
  """The mesh PartitionSpec that `RULES` give to an array with these logical axis names."""
  return nn.logical_to_mesh_axes(tuple(logical_names), RULES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches (B, L) are split over the batch axis, sequences kept whole."""
  return NamedSharding(mesh, mesh_axes(("batch", None)))


def process_batch_block(mesh: jax.sharding.Mesh, global_batch: int,
                        process_index: int | None = None) -> tuple[int, int]:
  """(b, blocks): the rows of each global batch that this process's devices hold under
  `batch_sharding` are the b-th of `blocks` equal contiguous blocks; the process feeds
  those rows (`omnimoe.data.loader`). Processes along the batch axes get distinct blocks;
  processes that differ only along `tensor` hold, and feed, the same rows."""
  process_index = jax.process_index() if process_index is None else process_index
  index_map = batch_sharding(mesh).devices_indices_map((global_batch, 1))
  spans = sorted({(rows.start or 0, global_batch if rows.stop is None else rows.stop)
                  for device, (rows, _) in index_map.items()
                  if device.process_index == process_index})
  lo, hi = spans[0][0], spans[-1][1]
  if (any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or global_batch % (hi - lo)
      or lo % (hi - lo)):
    raise ConfigError(f"mesh={dict(mesh.shape)}: process {process_index}'s devices hold rows "
                      f"{spans} of each batch of {global_batch}, not one contiguous block")
  return lo // (hi - lo), global_batch // (hi - lo)


def tree_shardings(boxed_tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Unboxed leaves (step counters, unannotated arrays) are replicated. A dimension that its
  mesh axes do not divide is a ConfigError naming the array.
  """
  def one(path, leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      names, shape = leaf.names, leaf.value.shape
    else:
      shape = getattr(leaf, "shape", ())
      names = (None,) * len(shape)
    spec = mesh_axes(names)
    for dim, axes in zip(shape, spec):
      if axes is None:
        continue
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if dim % size:
        raise ConfigError(f"mesh={dict(mesh.shape)}: {jax.tree_util.keystr(path)} of shape "
                          f"{tuple(shape)} (axes {tuple(names)}) has a dimension {dim} that "
                          f"mesh axes {axes} of size {size} do not divide")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
