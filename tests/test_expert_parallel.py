"""The expert op in two halves (one custom VJP) and sharded along d over a device mesh.

One device: the Pallas halves against the reference halves, the split op against the
float64 brute force (values and the gradients of x, up, down, weights), and the sharded op
on a one-device mesh. Eight fake CPU devices (a subprocess with
--xla_force_host_platform_device_count=8): the sharded op on meshes that split d = 96 two
and four ways, impl 'xla' and 'pallas' (interpret), against the brute force; the table
gradients come back d-sharded, and no all-reduce is larger than one device's table slice
(none of table size at all where the tables are not replicated over `data`). The tiny
LM's sharded train step against one device is in tests/test_sharding.py.

GPU: python -m pytest --noconftest -m gpu tests/test_expert_parallel.py
(the several-GPU test runs where two or more GPUs are visible).
"""
import functools
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from omnimoe import expert_parallel, reference, sharding
from omnimoe.pallas import expert_ops, expert_tokens
from tests import brute_force as bf
from tests.conftest import REPO, SUBPROCESS_ENV
from tests.test_pallas_router import HAS_GPU, MODES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
TOKEN_CONFIG = expert_ops.TokenConfig(block_t=4, block_d=32)
IMPLS = [pytest.param(("xla", True), id="xla"),
         *(pytest.param(("pallas", m.values[0]), id=f"pallas-{m.id}", marks=m.marks)
           for m in MODES)]
# (data, fsdp, tensor) on 8 devices: d split 2 ways over fsdp alone, over tensor alone (tables
# replicated over data), 4 ways over tensor x fsdp, and that with data = 2.
EIGHT_DEVICE_MESHES = ((1, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2))


def inputs(seed, tokens=36, d=96, n_experts=50, k=5):
  """float32 x, up, down, weights, dy and int32 ids, some outside [0, N) and one expert taken
  k times by one token and shared with another."""
  x, up, down, w, idx, dy = bf.expert_inputs(np.random.default_rng(seed), tokens, d,
                                             n_experts, k)
  idx[0, :] = idx[1, 0]
  idx[2::3, 1] = -3
  idx[4::5, 2] = n_experts
  return (x, up, down, w), idx, dy


def brute_force(args, idx, dy):
  args64 = [np.asarray(a, np.float64) for a in args]
  return (bf.atomic_experts(*args64, idx),
          bf.atomic_experts_grads(*args64, idx, np.asarray(dy, np.float64)))


def check(y, grads, want, tol=1e-5):
  """y and (dx, dup, ddown, dweights) against the brute force's."""
  want_y, want_grads = want
  assert bf.rel_err(y, want_y) < tol
  for name, g, w in zip(("dx", "dup", "ddown", "dweights"), grads, want_grads):
    assert g.shape == w.shape, name
    assert bf.rel_err(g, w) < tol, name


def value_and_grads(op, args, idx, dy):
  y, vjp = jax.vjp(lambda *a: op(*a, jnp.asarray(idx)), *args)
  return y, vjp(jnp.asarray(dy, y.dtype))


# ----------------------------------------------------------------------------------------
# One device.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("tokens,d,n_experts,k,dtype", [
    (37, 96, 50, 5, jnp.float32),     # T, d not multiples of the blocks
    (21, 64, 300, 12, jnp.bfloat16),
])
def test_pair_kernels_match_the_reference_halves(tokens, d, n_experts, k, dtype, interpret):
  (x, up, _, w), idx, _ = inputs(tokens + k, tokens, d, n_experts, k)
  x, up, w = (jnp.asarray(a, dtype) for a in (x, up, w))
  idx = jnp.asarray(idx)
  s = expert_tokens.pair_scores(x, up, idx, config=TOKEN_CONFIG, interpret=interpret)
  assert s.dtype == jnp.float32 and s.shape == idx.shape
  assert bf.rel_err(s, reference.pair_scores(x, up, idx)) < TOL[dtype]
  y = expert_tokens.pair_combine(w, up, idx, out_dtype=dtype, config=TOKEN_CONFIG,
                                 interpret=interpret)
  assert y.dtype == dtype and y.shape == x.shape
  assert bf.rel_err(y, reference.pair_combine(w, up, idx)) < TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,d,n_experts,k,dtype", [
    (36, 96, 50, 5, jnp.float32),
    (21, 64, 300, 12, jnp.bfloat16),
])
def test_split_op_matches_brute_force(tokens, d, n_experts, k, dtype, impl):
  impl, interpret = impl
  args, idx, dy = inputs(3, tokens, d, n_experts, k)
  args = [jnp.asarray(a, dtype) for a in args]
  op = functools.partial(expert_parallel.split_atomic_experts, impl=impl, interpret=interpret)
  y, grads = value_and_grads(op, args, idx, dy)
  assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
  check(y, grads, brute_force(args, idx, dy), TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_split_op_other_activations_match_reference(activation, impl):
  impl, interpret = impl
  args, idx, dy = inputs(5)
  args = [jnp.asarray(a) for a in args]
  op = functools.partial(expert_parallel.split_atomic_experts, activation=activation,
                         impl=impl, interpret=interpret)
  y, grads = value_and_grads(op, args, idx, dy)
  ref = lambda x, u, v, w, i: reference.atomic_experts(x, u, v, w, i, activation)
  want_y, want_grads = value_and_grads(ref, args, idx, dy)
  check(y, grads, (want_y, want_grads))


@pytest.mark.parametrize("impl", IMPLS)
def test_sharded_op_on_a_one_device_mesh(impl):
  """No axis splits anything: the op runs unsharded (no shard_map, no collective)."""
  impl, interpret = impl
  args, idx, dy = inputs(7)
  mesh = jax.make_mesh((1, 1, 1), sharding.AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  op = functools.partial(expert_parallel.sharded_atomic_experts, mesh=mesh,
                         table_axes=("tensor", "fsdp"), batch_axes=("data", "fsdp"),
                         impl=impl, interpret=interpret)
  y, grads = jax.jit(lambda *a: value_and_grads(op, a, idx, dy))(*args)
  check(y, grads, brute_force(args, idx, dy))


def test_layout_from_rules_and_bad_layouts():
  mesh = AbstractMesh((2, 2, 2), sharding.AXES)
  layout = expert_parallel.layout_from_rules(mesh)
  assert layout.table_axes == ("tensor", "fsdp") and layout.batch_axes == ("data", "fsdp")
  assert layout.shared_axes == ("fsdp",)
  assert layout.fits(8, 96) and not layout.fits(6, 96) and not layout.fits(8, 18)
  assert expert_parallel.layout_from_rules(AbstractMesh((1, 1, 1), sharding.AXES)) is None
  with pytest.raises(ValueError, match=r"must come last in both"):
    expert_parallel.TableLayout(mesh, ("fsdp", "tensor"), ("data", "fsdp"))
  with pytest.raises(ValueError, match=r"\['pipe'\] are not axes of the mesh"):
    expert_parallel.TableLayout(mesh, "pipe", "data")
  args, idx, _ = inputs(1, tokens=6)
  with pytest.raises(ValueError, match=r"T must be divisible by the batch axes"):
    expert_parallel.sharded_atomic_experts(*args, idx, mesh=mesh, table_axes=layout.table_axes,
                                           batch_axes=layout.batch_axes)
  with pytest.raises(ValueError, match=r"scalar activation"):
    expert_parallel.split_atomic_experts(*args, idx, activation="swiglu")


# ----------------------------------------------------------------------------------------
# Several devices.
# ----------------------------------------------------------------------------------------

def _all_reduce_sizes(hlo: str) -> list[int]:
  """Elements of every array that an all-reduce of the compiled HLO text produces."""
  sizes = []
  for line in hlo.splitlines():
    head = re.split(r" all-reduce(?:-start)?\(", line)
    if len(head) > 1:
      shapes = re.findall(r"\w+\[([\d,]*)\]", head[0].split("=", 1)[-1])
      sizes += [math.prod(int(n) for n in s.split(",") if n) for s in shapes]
  return sizes


def check_sharded_ops(meshes=EIGHT_DEVICE_MESHES, impls=("xla", "pallas"), interpret=None):
  """The sharded op on each mesh (data, fsdp, tensor) against the brute force; run in a
  subprocess with 8 fake CPU devices, or on GPUs."""
  args, idx, dy = inputs(9)
  want = brute_force(args, idx, dy)
  n_experts, d = args[1].shape
  for impl in impls:
    for shape in meshes:
      mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape)),
                                jax.devices()[:math.prod(shape)])
      layout = expert_parallel.layout_from_rules(mesh)
      place = lambda a, spec: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))
      tables = P(None, layout.table_axes)
      x, up, down, w = (place(args[0], P(layout.batch_axes)), place(args[1], tables),
                        place(args[2], tables), place(args[3], P(layout.batch_axes)))
      op = functools.partial(expert_parallel.sharded_atomic_experts, mesh=mesh,
                             table_axes=layout.table_axes, batch_axes=layout.batch_axes,
                             impl=impl, interpret=interpret)
      step = jax.jit(lambda *a: value_and_grads(op, a, idx, dy))
      y, grads = step(x, up, down, w)
      check(y, grads, want)
      slice_size = n_experts * d // layout.size(layout.table_axes)
      for g in grads[1:3]:  # dU, dV: d-sharded like the tables
        assert g.sharding.is_equivalent_to(NamedSharding(mesh, tables), 2), g.sharding
        assert g.addressable_shards[0].data.size == slice_size
      sizes = _all_reduce_sizes(step.lower(x, up, down, w).compile().as_text())
      limit = slice_size if shape[0] > 1 else slice_size - 1  # replicated over data or not
      assert sizes and max(sizes) <= limit, (shape, sorted(sizes))
      print(impl, shape, "all-reduce sizes", sorted(set(sizes)))
  print("sharded ops match")


def test_sharded_op_on_eight_devices():
  env = dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-c",
       "from tests.test_expert_parallel import check_sharded_ops; check_sharded_ops()"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "sharded ops match" in proc.stdout, proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or jax.device_count() < 2, reason="needs two GPUs")
def test_sharded_op_on_gpus():
  """Compiled kernels, real collectives: d split over 2 GPUs (fsdp), and data-parallel."""
  meshes = [(1, 2, 1), (2, 1, 1)] + ([(1, 2, 2), (2, 2, 1)] if jax.device_count() >= 4 else [])
  check_sharded_ops(meshes, impls=("pallas",), interpret=False)
