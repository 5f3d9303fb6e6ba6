"""OmniMoE-JAX: atomic experts with Cartesian product routing, in JAX/Flax + Pallas."""
from omnimoe import ops, reference

__all__ = ["ops", "reference"]
__version__ = "0.1.0"
