"""Lowering of Pallas kernels to Triton IR for CUDA, on any host (CPU CI included).

`jax.export` for platform "cuda" runs the Pallas -> Triton translation without a GPU, so a
construct that interpret mode accepts and the Triton lowering lacks (slicing a register
array, a bool max reduction, ...) fails here instead of on the first GPU run.
"""
import jax
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"


def triton_kernels(fn, *args) -> int:
  """How many Triton kernel calls the CUDA lowering of `jax.jit(fn)(*args)` holds (args
  may be `jax.ShapeDtypeStruct`s)."""
  lowered = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
  return lowered.mlir_module().count(f"@{TRITON_CALL}")
