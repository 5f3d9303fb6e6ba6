"""The rule path's fused forward grid (`rule_gemm`, a Mosaic GPU kernel) against float64
brute force on the pairs of the full N-way top-k: A[t, e] = exp(score) act(<x_t, up[e]>)
on the routed pairs, 0 elsewhere. On the CPU the kernel runs in Mosaic GPU interpret mode
and its GPU form is lowered (no GPU needed); the GPU test runs it compiled. Errors are
||got - want|| / ||want|| < 1e-2 (A is stored in bf16 / f16).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from omnimoe import reference
from omnimoe.pallas import expert_rule, rule_gemm
from tests import brute_force as bf
from tests.test_pallas_expert_rule import check, rule_inputs

# small tiles for interpret mode: 64 tokens, 16-column epilogue sub-tiles
SMALL = rule_gemm.RuleGemmConfig(tile_m=64, tile_k=32, stages=2, epi_m=64, epi_n=16)
SMALL_TWO_ROWS = rule_gemm.RuleGemmConfig(tile_m=128, tile_k=32, stages=2, epi_m=64, epi_n=16)
TOL = 1e-2


def brute_force_grid(args, pairs, activation):
  """A in float64 and which entries the top-k routes."""
  x, up = (np.asarray(a, np.float64) for a in args[:2])
  scores, idx = pairs
  act = {"silu": lambda s: s / (1 + np.exp(-s)), "relu": lambda s: np.maximum(s, 0),
         "identity": lambda s: s}[activation]
  a = np.zeros((x.shape[0], up.shape[0]))
  routed = np.zeros(a.shape, bool)
  for t in range(x.shape[0]):
    a[t, idx[t]] = np.exp(scores[t]) * act(up[idx[t]] @ x[t])
    routed[t, idx[t]] = True
  return a, routed


def check_grid(got, want, routed):
  assert not np.any(np.asarray(got)[~routed])  # nothing outside the top-k
  assert bf.rel_err(got, want) < TOL


@pytest.mark.parametrize("tokens,d,n_x,n_y,k,dtype,quantum,activation,config", [
    (100, 64, 8, 32, 64, jnp.bfloat16, None, "silu", SMALL),   # k = N / 4; T padded to 128
    (37, 64, 4, 64, 256, jnp.float16, None, "relu", SMALL),    # k = N; two sub-tiles a tile
    (64, 32, 8, 32, 40, jnp.bfloat16, 0.5, "silu", SMALL),     # sums tie often: the cut decides
    (5, 64, 3, 32, 1, jnp.bfloat16, None, "identity", SMALL),  # k = 1, one ragged token tile
    # 2 x 4 sub-tiles a tile: the ly slots refilled, lx read again for the second 64 rows
    (150, 64, 3, 128, 96, jnp.bfloat16, None, "silu", SMALL_TWO_ROWS),
])
def test_values(tokens, d, n_x, n_y, k, dtype, quantum, activation, config):
  rng = np.random.default_rng(tokens + d + k)
  args, (theta, cut), pairs, _ = rule_inputs(rng, tokens, d, n_x, n_y, k, dtype, quantum)
  got = rule_gemm.rule_gemm(args[0], args[1], args[3], args[4], theta, cut,
                            activation=activation, config=config, interpret=True)
  want, routed = brute_force_grid(args, pairs, activation)
  assert got.dtype == dtype and got.shape == want.shape
  check_grid(got, want, routed)


def test_what_it_serves():
  assert rule_gemm.tile_n(320) == 160 and rule_gemm.tile_n(256) == 128
  assert rule_gemm.tile_n(32, SMALL) == 16 and rule_gemm.tile_n(100) is None
  assert rule_gemm.supported(jnp.bfloat16, jnp.bfloat16, 1024, 320, "silu")
  assert rule_gemm.runs_here(True)  # interpret mode, on any host
  if jax.devices()[0].platform == "cpu":
    assert not rule_gemm.runs_here(False)
  assert not rule_gemm.supported(jnp.bfloat16, jnp.bfloat16, 1024, 320, "silu",
                                 rule_gemm.RuleGemmConfig(stages=4))  # > 227 KB
  for args in ((jnp.float32, jnp.float32, 1024, 320, "silu"),    # no tf32 GEMM here
               (jnp.bfloat16, jnp.float16, 1024, 320, "silu"),
               (jnp.bfloat16, jnp.bfloat16, 96, 320, "silu"),     # d % tile_k
               (jnp.bfloat16, jnp.bfloat16, 1024, 100, "silu"),   # no tile in one grid row
               (jnp.bfloat16, jnp.bfloat16, 1024, 320, "gelu")):
    assert not rule_gemm.supported(*args), args
  x = jnp.zeros((8, 96), jnp.bfloat16)
  with pytest.raises(ValueError, match="does not serve"):
    rule_gemm.rule_gemm(x, jnp.zeros((320 * 320, 96), jnp.bfloat16), jnp.zeros((8, 320)),
                        jnp.zeros((8, 320)), jnp.zeros((8,)), jnp.zeros((8,), jnp.int32))


def test_config_is_checked():
  with pytest.raises(ValueError, match="tile_m must be a power of two"):
    rule_gemm.RuleGemmConfig(tile_m=96)
  with pytest.raises(ValueError, match="multiple of 64 and of epi_m"):
    rule_gemm.RuleGemmConfig(tile_m=32, epi_m=32)
  with pytest.raises(ValueError, match="stages must be an int >= 1"):
    rule_gemm.RuleGemmConfig(stages=0)
  with pytest.raises(ValueError, match="forward_grid must be one of"):
    expert_rule.RuleConfig(forward_grid="fused")


@pytest.mark.parametrize("n", [320, 256])
def test_lowers_for_gpu(n):
  """The GPU form (transposed U tiles, global-memory loads in the wgmma layout) through
  Mosaic GPU's lowering and layout inference at the headline's sizes, on any host."""
  shapes = [jax.ShapeDtypeStruct(s, t) for s, t in (
      ((4096, 1024), jnp.bfloat16), ((n * n, 1024), jnp.bfloat16), ((4096, n), jnp.float32),
      ((4096, n), jnp.float32), ((4096,), jnp.float32), ((4096,), jnp.int32))]
  fn = jax.jit(lambda *a: rule_gemm.rule_gemm(*a, num_sms=132, interpret=False))
  module = export.export(fn, platforms=["cuda"])(*shapes).mlir_module()
  assert module.count("mosaic_gpu") >= 1


def test_rule_op_forward_alone_by_the_gemm():
  """`RuleConfig(forward_grid="gemm")`: the forward alone takes A from `rule_gemm`, the
  forward under vjp and the gradients keep the passes; all against brute force."""
  rng = np.random.default_rng(3)
  args, rule, pairs, dy = rule_inputs(rng, 70, 64, 6, 32, 48, jnp.bfloat16)
  config = expert_rule.RuleConfig(forward_grid="gemm", gemm=SMALL)
  forward = jax.make_jaxpr(lambda *a: expert_rule.atomic_experts_rule(
      *a, *rule, config=config, interpret=True))(*args)
  assert str(forward).count("mpmd_map") == 1  # the Mosaic GPU kernel, not a fallback
  check(args, rule, pairs, dy, config, TOL, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not rule_gemm.runs_here(False), reason="needs a Hopper GPU")
@pytest.mark.parametrize("n,k,activation", [(320, 512, "silu"), (256, 4096, "relu")])
def test_on_gpu(n, k, activation):
  """Compiled, at the headline's grid and at 256 x 256; 300 tokens (a ragged tile)."""
  rng = np.random.default_rng(8)
  args, (theta, cut), pairs, dy = rule_inputs(rng, 300, 256, n, n, k, jnp.bfloat16)
  got = rule_gemm.rule_gemm(args[0], args[1], args[3], args[4], theta, cut,
                            activation=activation)
  check_grid(got, *brute_force_grid(args, pairs, activation))
  if activation in reference.ACTIVATIONS:
    check(args, (theta, cut), pairs, dy, expert_rule.RuleConfig(forward_grid="gemm"), TOL,
          interpret=False)
