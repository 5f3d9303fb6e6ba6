"""Second-order reverse mode for ops whose first order is Pallas kernels.

The kernels are not differentiable themselves (Pallas calls with aliased outputs, atomics),
so a wrapped op computes its output and first-order gradients with the kernels (its own
custom VJP) and differentiates both, only when asked (a Hessian-vector product, a gradient
penalty), as its reference's autodiff: exact maths at XLA speed, paid only where a second
order is taken. `_kernel_forward` is a custom JVP so that an outer differentiation of the
op's forward rule sees the reference's tangent, not the kernels. (A third order would
differentiate the kernels' backward inside `_kernel_grads`' rule: unsupported.) Forward
mode (jax.jvp) of the op itself is not defined (a custom VJP).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def by_reference(first_order: Callable, reference: Callable, num_diff: int) -> Callable:
  """`op(*args)`: `first_order(*args)`'s value and first-order gradients, second order by
  `reference(*args)`'s autodiff. args[:num_diff] are differentiable, the rest arrays with
  no gradient (ids, a selection); static choices are closed over by the two functions."""

  def split(args):
    return args[:num_diff], args[num_diff:]

  def kernel_vjp_of(args):
    diff, rest = split(args)
    return jax.vjp(lambda *d: first_order(*d, *rest), *diff)

  @jax.custom_jvp
  def kernel_forward(*args):
    """(y, the kernels' VJP) by the kernels; its tangent is the reference's."""
    return kernel_vjp_of(args)

  @kernel_forward.defjvp
  def kernel_forward_jvp(primals, tangents):
    y, kernel_vjp = kernel_forward(*primals)
    diff, rest = split(primals)
    dy = jax.jvp(lambda *d: reference(*d, *rest), diff, tangents[:num_diff])[1]
    return (y, kernel_vjp), (dy, jax.tree.map(_zero_tangent, kernel_vjp))

  @jax.custom_vjp
  def kernel_grads(args, dy, kernel_vjp):
    """The first-order gradients by the kernels (`kernel_vjp`), differentiated as the
    reference's. `kernel_vjp`'s residuals are functions of `args`, so they get no
    cotangent of their own (the reference's path already counts them)."""
    return tuple(kernel_vjp(dy))

  def kernel_grads_fwd(args, dy, kernel_vjp):
    return kernel_grads(args, dy, kernel_vjp), (args, dy)

  def kernel_grads_bwd(residuals, cotangents):
    args, dy = residuals
    diff, rest = split(args)
    grads = lambda *a: tuple(jax.vjp(lambda *d: reference(*d, *rest), *a[:-1])[1](a[-1]))
    back = jax.vjp(grads, *diff, dy)[1](tuple(cotangents))
    return (*back[:-1], *(None for _ in rest)), back[-1], None

  kernel_grads.defvjp(kernel_grads_fwd, kernel_grads_bwd)

  @jax.custom_vjp
  def op(*args):
    return first_order(*args)

  def op_fwd(*args):
    y, kernel_vjp = kernel_forward(*args)
    return y, (args, kernel_vjp)

  def op_bwd(residuals, dy):
    args, kernel_vjp = residuals
    return (*kernel_grads(args, dy, kernel_vjp), *(None for _ in args[num_diff:]))

  op.defvjp(op_fwd, op_bwd)
  return op


def _zero_tangent(a):
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)
