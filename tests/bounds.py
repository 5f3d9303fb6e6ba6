"""An out-of-bounds guard for the Pallas kernels in interpret mode.

Why: interpret mode runs an array-indexed `plt.load` / `plt.store` as an XLA gather /
scatter, which clamps an out-of-range index into the array (a negative one wraps), so a
kernel whose own clamp is missing still gives the right answer on CPU as long as its
mask is right; on a GPU the same kernel reads or writes outside the buffer. The guard
wraps `plt.load`, `plt.store` and `plt.atomic_add` (the attributes of the module object
every kernel imports as `plt`) and checks, inside the kernel, every address they take.

The rule checked is the kernels' own convention (`omnimoe.pallas.common.token_block`):
  loads     every lane's index lies in the ref's shape, masked-off lanes included (the
            kernels clamp *and* mask);
  stores    every lane the mask keeps lies in the ref's shape; a masked-off lane may
            point anywhere (the kernels keep raw indices there on purpose: in interpret
            mode a masked lane still takes part in the scatter, and a clamped index could
            collide with a live one); `strict_stores=True` checks those too;
  atomics   every lane (the kernels pass no mask).
Index arrays and slices (`pl.ds`) of any dimension are checked; a scalar read such as
`starts_ref[b]` (no `plt` call) is not. Interpret mode only: the check runs as a
`jax.debug.callback` in the kernel body, which the Triton lowering does not take.

Usage:
  with bounds.checked():          # AssertionError on exit if any address was out of range
    ...run kernels (interpret=True)...
  with bounds.recording() as found:  # the violations, as `Violation`s, for the test to judge
    ...
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.state import indexing
from jax._src.state import primitives as state_primitives
from jax.experimental.pallas import triton as plt

_PALLAS_DIR = os.path.join("omnimoe", "pallas")


@dataclasses.dataclass(frozen=True)
class Violation:
  op: str            # "load", "store" or "atomic_add"
  site: str          # the kernel's line that traced the access (file:line function)
  shape: tuple       # the ref's shape
  lanes: int         # how many lanes were out of range (in one program's call)
  example: tuple     # one such lane's index, per dimension

  def __str__(self):
    return (f"{self.op} at {self.site}: {self.lanes} lane(s) outside shape {self.shape}, "
            f"e.g. index {self.example}")


def _site() -> str:
  """The innermost frame in omnimoe/pallas that made the access, else the caller's."""
  frames = traceback.extract_stack()[:-3]
  for frame in reversed(frames):
    if _PALLAS_DIR in frame.filename:
      return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
  frame = frames[-1]
  return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"


def _lane_indices(nd: indexing.NDIndexer):
  """Per dimension of the ref, the index of every lane of the access, broadcast to the
  accessed shape (numpy advanced-indexing layout, as `NDIndexer.get_indexer_shape`)."""
  out_shape = tuple(nd.get_indexer_shape())
  is_int = [not isinstance(i, indexing.Slice) for i in nd.indices]
  int_shape = tuple(nd.int_indexer_shape)
  int_dims = np.flatnonzero(is_int)
  contiguous = len(int_dims) == 0 or bool(np.all(np.diff(int_dims) == 1))
  pos = int(int_dims[0]) if len(int_dims) and contiguous else 0  # where int dims go
  coords, n_slices = [], 0
  for index in nd.indices:
    if isinstance(index, indexing.Slice):
      axis = n_slices if n_slices < pos else n_slices + len(int_shape)
      n_slices += 1
      lane = index.start + index.stride * jnp.arange(index.size, dtype=jnp.int32)
      shape = [1] * len(out_shape)
      shape[axis] = index.size
      coords.append(jnp.broadcast_to(lane.reshape(shape), out_shape))
    else:
      value = jnp.broadcast_to(jnp.asarray(index, jnp.int32), int_shape)
      shape = (1,) * pos + int_shape + (1,) * (len(out_shape) - pos - len(int_shape))
      coords.append(jnp.broadcast_to(value.reshape(shape), out_shape))
  return coords, out_shape


def _check(found: list, op: str, ref_or_view, idx, mask) -> None:
  ref, transforms = state_primitives.get_ref_and_transforms(ref_or_view, idx, op)
  if not transforms:
    return  # the whole ref
  if len(transforms) != 1 or not isinstance(transforms[0], indexing.NDIndexer):
    raise NotImplementedError(f"bounds guard: {op} through {transforms}")
  [nd] = transforms
  shape = tuple(ref.shape)
  coords, out_shape = _lane_indices(nd)
  bad = jnp.zeros(out_shape, bool)
  for c, size in zip(coords, shape):
    bad = bad | (c < 0) | (c >= size)
  if mask is not None:
    bad = bad & jnp.broadcast_to(mask, out_shape)
  flat = bad.reshape(-1)
  first = jnp.argmax(flat)
  example = [c.reshape(-1)[first] for c in coords]
  site = _site()

  def record(count, *example):
    if int(count):
      found.append(Violation(op, site, shape, int(count), tuple(int(e) for e in example)))

  jax.debug.callback(record, jnp.sum(flat.astype(jnp.int32)), *example)


@contextlib.contextmanager
def recording(*, strict_stores: bool = False):
  """Within: kernels traced in interpret mode check their addresses; yields the list the
  violations are appended to (complete once the block has run: it waits for them)."""
  found: list[Violation] = []
  load, store, atomic_add = plt.load, plt.store, plt.atomic_add

  def checked_load(ref, *, mask=None, other=None, **kwargs):
    _check(found, "load", ref, None, None)
    return load(ref, mask=mask, other=other, **kwargs)

  def checked_store(ref, val, *, mask=None, **kwargs):
    _check(found, "store", ref, None, None if strict_stores else mask)
    return store(ref, val, mask=mask, **kwargs)

  def checked_atomic_add(ref, idx, val, *, mask=None):
    _check(found, "atomic_add", ref, idx, None)
    return atomic_add(ref, idx, val, mask=mask)

  jax.clear_caches()  # no kernel traced without the checks runs from a cache
  plt.load, plt.store, plt.atomic_add = checked_load, checked_store, checked_atomic_add
  try:
    yield found
    jax.effects_barrier()
  finally:
    plt.load, plt.store, plt.atomic_add = load, store, atomic_add
    jax.clear_caches()  # nor one traced with them (its callbacks would outlive the list)


@contextlib.contextmanager
def checked(*, strict_stores: bool = False):
  """`recording`, and an AssertionError on exit naming every violation."""
  with recording(strict_stores=strict_stores) as found:
    yield found
  if found:
    first = {}
    for v in found:  # one line per access site: the program calls that broke it
      first.setdefault((v.op, v.site, v.shape), (v, sum(
          1 for u in found if (u.op, u.site, u.shape) == (v.op, v.site, v.shape))))
    raise AssertionError("out-of-bounds accesses:\n" + "\n".join(
        f"{v} ({calls} call(s))" for v, calls in first.values()))
