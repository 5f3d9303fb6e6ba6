"""Public functional ops: validated entry points that pick an implementation.

  cartesian_topk(lx, ly, k, *, sorted=True, impl=None)
                                             -> (scores (T, k) f32, indices (T, k) i32)
  atomic_experts(x, up, down, weights, indices, *, activation="silu", gate=None, impl=None,
                 unique_indices=False)       -> (T, d)
  gate_logits(x, gate, dtype)                -> (T, n) f32: the router's gate GEMM

`impl` is "xla" (the plain-jnp oracle in `omnimoe.reference`) or "pallas" (the kernels in
`omnimoe.pallas`); None picks Pallas on GPU and XLA elsewhere. Inputs are checked here,
at the boundary, so that a wrong shape or dtype is a clear error rather than a kernel
fault; index ranges are checked whenever the indices are concrete (outside jit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe import reference

IMPLS = ("xla", "pallas")


def default_impl() -> str:
  """Pallas on GPU, plain XLA elsewhere (Pallas GPU kernels do not compile for CPU)."""
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_impl(impl: str | None) -> str:
  """'xla' or 'pallas' for an impl argument (None: `default_impl()`); anything else raises."""
  impl = default_impl() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
  return impl


def check_rank(name: str, a, rank: int, meaning: str) -> None:
  """A ValueError naming `name` unless `a` has rank `rank` (`meaning`: its axes)."""
  if np.ndim(a) != rank:
    raise ValueError(f"{name} must have rank {rank} ({meaning}), got shape {np.shape(a)}")


def _check_float(name: str, a) -> None:
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got {a.dtype}")


def check_k(k: int, n_x: int, n_y: int) -> None:
  """A top-k over an n_x x n_y grid needs 1 <= k <= n_x n_y (also the kernels' entries)."""
  if not 1 <= k <= n_x * n_y:
    raise ValueError(f"k must satisfy 1 <= k <= n_x * n_y = {n_x * n_y}, got {k}")


def _check_indices(indices, num_experts: int, unique: bool = False,
                   values: bool = True) -> None:
  """Indices must be int32; with `values`, their range (and with `unique`, that no row
  repeats an id) is checked when they are concrete."""
  if indices.dtype != jnp.int32:
    raise TypeError(f"indices must be int32, got {indices.dtype}")
  if not isinstance(unique, (bool, np.bool_)):  # a promise that changes stores: no guessing
    raise TypeError(f"unique_indices must be a bool, got {unique!r}")
  if not values or isinstance(indices, jax.core.Tracer):
    return
  idx = np.asarray(indices)
  if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
    raise ValueError(f"indices must lie in [0, {num_experts}); got values in "
                     f"[{idx.min()}, {idx.max()}]")
  if unique and idx.size:
    repeats = np.any(np.diff(np.sort(idx, axis=-1), axis=-1) == 0, axis=-1)
    if repeats.any():
      raise ValueError(f"unique_indices=True, but token {int(np.argmax(repeats))} lists an "
                       f"expert more than once")


def cartesian_topk(lx: jax.Array, ly: jax.Array, k: int, *, sorted: bool = True,  # noqa: A002
                   impl: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the Cartesian grid of `lx[t, i] + ly[t, j]`.

  Args:
    lx, ly: (T, n) row and column scores (log-probabilities), same T.
    k: experts per token, a Python int with 1 <= k <= n_x * n_y.
    sorted: True (default): scores in descending order, equal scores by ascending expert
      id. False: the same set in whatever order the implementation finds cheapest (as
      torch.topk's switch); the Pallas path for k > 64 then skips its final sort and
      returns rows ascending, within a row by descending ly (see
      `omnimoe.pallas.router_threshold`). The XLA path always sorts.
    impl: "xla", "pallas" or None (Pallas on GPU, XLA elsewhere). Pallas: a fused kernel
      for k <= 64, a threshold search (`router_threshold`) for k in the thousands.
  Returns:
    scores (T, k) float32 and indices (T, k) int32, the flat expert ids `i * n_y + j`:
    the k largest float32 sums, ties broken toward the lower expert id. Scores are
    differentiable in lx and ly.
  """
  check_rank("lx", lx, 2, "tokens, rows")
  check_rank("ly", ly, 2, "tokens, columns")
  _check_float("lx", lx)
  _check_float("ly", ly)
  if lx.shape[0] != ly.shape[0]:
    raise ValueError(f"lx and ly must have the same number of tokens, got {lx.shape} "
                     f"and {ly.shape}")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
    raise TypeError(f"k must be a Python int, got {type(k).__name__}")
  if not isinstance(sorted, (bool, np.bool_)):
    raise TypeError(f"sorted must be a bool, got {type(sorted).__name__}")
  check_k(k, lx.shape[1], ly.shape[1])
  if resolve_impl(impl) == "pallas":
    from omnimoe.pallas import router_topk
    return router_topk.cartesian_topk(lx, ly, int(k), sorted=bool(sorted))
  return reference.cartesian_topk(lx, ly, int(k))


def check_expert_inputs(x, up, down, weights, indices, activation: str = "silu", gate=None,
                        unique_indices: bool = False, check_ids: bool = True) -> None:
  """`atomic_experts`' input contract (also `omnimoe.expert_parallel`'s): a ValueError or
  TypeError naming the argument; with `check_ids`, ids checked for range (and repeats)
  when concrete (the split op masks ids outside [0, N) instead)."""
  check_rank("x", x, 2, "tokens, hidden")
  check_rank("up", up, 2, "experts, hidden")
  check_rank("down", down, 2, "experts, hidden")
  check_rank("weights", weights, 2, "tokens, k")
  check_rank("indices", indices, 2, "tokens, k")
  for name, a in (("x", x), ("up", up), ("down", down), ("weights", weights)):
    _check_float(name, a)
  if up.shape != down.shape:
    raise ValueError(f"up and down must have the same shape, got {up.shape} and {down.shape}")
  if x.shape[1] != up.shape[1]:
    raise ValueError(f"hidden size mismatch: x has d={x.shape[1]}, tables have "
                     f"d={up.shape[1]}")
  if weights.shape != indices.shape or weights.shape[0] != x.shape[0]:
    raise ValueError(f"weights and indices must both be (T, k) with T={x.shape[0]}, got "
                     f"{weights.shape} and {indices.shape}")
  if activation not in reference.EXPERT_ACTIVATIONS:
    raise ValueError(f"activation must be one of {reference.EXPERT_ACTIVATIONS}, got "
                     f"{activation!r}")
  if (gate is None) != (activation != "swiglu"):
    raise ValueError(f"gate must be given for activation 'swiglu' and only then; got "
                     f"activation={activation!r} and gate={None if gate is None else 'array'}")
  if gate is not None:
    _check_float("gate", gate)
    if gate.shape != up.shape:
      raise ValueError(f"gate must have the shape of up {up.shape}, got {gate.shape}")
  _check_indices(indices, up.shape[0], unique_indices, values=check_ids)


def atomic_experts(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array,
                   indices: jax.Array, *, activation: str = "silu",
                   gate: jax.Array | None = None, impl: str | None = None,
                   unique_indices: bool = False) -> jax.Array:
  """Atomic experts: `y_t = sum_k act(<x_t, up[e_tk]>) * weights_tk * down[e_tk]`.

  Args:
    x: (T, d) tokens. up, down: (N, d) expert tables. weights: (T, k) routing weights.
    indices: (T, k) int32 expert ids in [0, N).
    activation: one of `reference.EXPERT_ACTIVATIONS`. "swiglu" replaces
      `act(<x, up[e]>)` by `silu(<x, gate[e]>) * <x, up[e]>` and needs `gate`.
    gate: (N, d) third table, for activation "swiglu" only.
    impl: "xla", "pallas" or None (Pallas on GPU, XLA elsewhere). The Pallas kernels cover
      the scalar activations; "swiglu" runs on XLA (impl None) until its kernels exist.
    unique_indices: True promises that no token lists an expert twice (the router's top-k
      never does), so paths that scatter pairs into (T, N) grids may store instead of
      adding (`omnimoe.pallas.expert_dense`). Checked when indices are concrete; if it
      is broken under jit, the repeated pairs' contribution is undefined (as with
      `jnp.ndarray.at[...].set(..., unique_indices=True)`).
  Returns:
    (T, d) in x.dtype, accumulated in float32. Differentiable in x, up, down, weights
    (and gate): on XLA in every mode; on Pallas in reverse mode to second order (Hessian-
    vector products, gradient penalties: the kernels give the first order, the reference's
    autodiff the second), not in forward mode (jax.jvp; a custom VJP).
  """
  check_expert_inputs(x, up, down, weights, indices, activation, gate, unique_indices)
  impl = "xla" if gate is not None and impl is None else resolve_impl(impl)
  if impl == "pallas":
    if gate is not None:
      raise NotImplementedError("the Pallas expert kernels cover the scalar activations; "
                                "use impl='xla' (or None) for activation 'swiglu'")
    from omnimoe.pallas import expert_ops
    return expert_ops.atomic_experts(x, up, down, weights, indices, activation=activation,
                                     unique_indices=unique_indices)
  return reference.atomic_experts(x, up, down, weights, indices, activation, gate)


@jax.custom_vjp
def _float32_logits(x: jax.Array, gate: jax.Array) -> jax.Array:
  return jnp.dot(x, gate, preferred_element_type=jnp.float32)


def _float32_logits_fwd(x, gate):
  return _float32_logits(x, gate), (x, gate)


def _float32_logits_bwd(residuals, g):
  x, gate = residuals
  g = g.astype(x.dtype)  # the backward of a layer computing in x.dtype
  dx = jnp.dot(g, gate.T, preferred_element_type=jnp.float32).astype(x.dtype)
  dgate = jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(gate.dtype)
  return dx, dgate


_float32_logits.defvjp(_float32_logits_fwd, _float32_logits_bwd)


def gate_logits(x: jax.Array, gate: jax.Array, dtype) -> jax.Array:
  """(T, n) float32 logits `x @ gate`, the operands in `dtype`, float32 accumulation.

  The logits are never rounded to `dtype`: bf16-rounded log-probabilities tie at the k-th
  sum in a third of the rows, which changes nothing in the maths but costs the top-k kernel
  a tie-break. The backward is a `dtype` layer's (cotangent rounded to `dtype`, GEMMs on
  `dtype` operands), so with bf16 the gates cost what any bf16 layer costs, not a float32
  GEMM's 2-4x; with float32 it is plain autodiff.
  """
  check_rank("x", x, 2, "T, d")
  check_rank("gate", gate, 2, "d, n")
  if x.shape[1] != gate.shape[0]:
    raise ValueError(f"x (T, d) and gate (d, n) disagree on d: {x.shape} vs {gate.shape}")
  for name, a in (("x", x), ("gate", gate)):
    _check_float(name, a)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
  return _float32_logits(x.astype(dtype), gate.astype(dtype))
