"""Plumbing shared by the Pallas kernels: where they run, how they launch, small helpers.

Every kernel here uses the Triton lowering of Pallas (gathers through refs with index
arrays, masked loads/stores and atomics are what these kernels are made of; Mosaic GPU
has no hardware row gather on Hopper). A move to Mosaic GPU replaces kernel bodies only:
the wrappers in `router_topk` and `expert_ops` know nothing of the backend.

Interpret mode: `interpret=None` means "interpret unless the default backend is a GPU",
so the same public functions run the real kernel code on CPU (tests) and compile on GPU.
`INTERPRET = True` forces interpret mode everywhere (e.g. to debug on a GPU host).
"""
from __future__ import annotations

import functools
import numbers
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from omnimoe import reference

INTERPRET = False

# JAX 0.11 warns (deprecation id 'jax-pallas-triton') each time a Triton pallas_call is
# *lowered*, i.e. when the enclosing jit compiles, after our functions have returned; a
# filter scoped to the call site cannot see it. So the one message is silenced for the
# process the first time one of our kernels is built, and nothing else is.
TRITON_DEPRECATION = (r"The Pallas Triton backend is deprecated and will be removed in a "
                      r"future JAX version")


@functools.cache
def _quiet_triton_deprecation() -> None:
  warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def resolve_interpret(interpret: bool | None) -> bool:
  if interpret is None:
    return INTERPRET or jax.default_backend() != "gpu"
  return bool(interpret)


def triton_call(kernel, *, out_shape, grid, num_warps: int, num_stages: int,
                interpret: bool, name: str, input_output_aliases=None):
  """`pl.pallas_call` on the Triton lowering; every ref is the whole array (no BlockSpecs)."""
  _quiet_triton_deprecation()
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
      input_output_aliases=input_output_aliases or {},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def pow2(n: int, minimum: int = 2) -> int:
  """Smallest power of two >= max(n, minimum): Triton needs power-of-two array sizes."""
  n = max(int(n), minimum)
  return 1 << (n - 1).bit_length()


def check_pow2(field: str, value, *, minimum: int = 1, auto: bool = False,
               why: str = "") -> None:
  """ValueError naming `field` unless `value` is a power of two >= minimum (as Triton's
  array sizes and warp counts must be), or 0 where `auto` (0: chosen by size)."""
  if auto and value == 0:
    return
  if not isinstance(value, numbers.Integral) or value < minimum or value & (value - 1):
    rule = ("0 (auto) or " if auto else "") + "a power of two"
    rule += (f" >= {minimum}" if minimum > 1 else "") + why
    raise ValueError(f"{field} must be {rule}, got {value!r}")


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def iota(size: int, offset=0):
  return offset + jnp.arange(size, dtype=jnp.int32)


def lanes(width: int, size: int, tile=0):
  """Lanes `tile * width + [0, width)` of an axis of length `size`: (raw, for_loads, inside).

  `for_loads` is clamped into the axis (the clamp-and-mask convention of `token_block`)
  only where a lane can pass its end, i.e. unless `width` divides `size` (callers run
  tiles 0 .. ceil(size / width) - 1). Elsewhere the clamp would change no index and cost
  bandwidth: a min() hides the lanes' contiguity from Triton's alignment analysis, which
  then loads them one element a thread instead of in 16-byte vectors.
  """
  raw = iota(width, tile * width)
  for_loads = raw if size % width == 0 else jnp.minimum(raw, size - 1)
  return raw, for_loads, raw < size


def activation_with_grad(name: str, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """act(s) and act'(s), elementwise, from the reference's activation by forward-mode AD."""
  return jax.jvp(reference.ACTIVATIONS[name], (s,), (jnp.ones_like(s),))


def token_block(block_t: int, tokens: int):
  """This program's token ids t, which are real (t < tokens), and t clamped for loads.

  Convention in every kernel here: loads clamp their indices into range *and* mask
  (where an index can leave the range at all: `lanes`); stores mask and keep the raw
  index. (On GPU a masked lane touches no memory; in interpret mode a masked store lane
  still takes part in the scatter, so a clamped index could collide with a live lane,
  while an out-of-range one is dropped.)
  """
  t = iota(block_t, pl.program_id(0) * block_t)
  return t, t < tokens, jnp.minimum(t, tokens - 1)


def mma_dtype(*dtypes) -> jnp.dtype:
  """Operand dtype of in-kernel matrix products: bfloat16 if every input is, else f32."""
  bf16 = jnp.dtype(jnp.bfloat16)
  return bf16 if all(jnp.dtype(d) == bf16 for d in dtypes) else jnp.dtype(jnp.float32)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation; float32 operands multiply in full precision."""
  highest = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=highest)
