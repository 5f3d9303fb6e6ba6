"""Walking traced programs: every equation of a jaxpr, nested jaxprs included."""
from collections.abc import Iterator

from jax.extend import core as jax_core


def equations(jaxpr) -> Iterator:
  """Every equation of `jaxpr` (a Jaxpr or ClosedJaxpr) and of the jaxprs nested in its
  equations' parameters (jit, custom_jvp / custom_vjp, control flow), depth first."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
          yield from equations(sub)
