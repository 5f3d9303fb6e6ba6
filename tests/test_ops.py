"""The public ops: boundary validation and the XLA path under jit and grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import ops
from tests import brute_force as bf


def make_inputs(tokens=11, d=24, n_experts=16, k=3, seed=0):
  rng = np.random.default_rng(seed)
  return dict(
      x=jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32),
      up=jnp.asarray(rng.standard_normal((n_experts, d)), jnp.float32),
      down=jnp.asarray(rng.standard_normal((n_experts, d)), jnp.float32),
      weights=jnp.asarray(rng.uniform(0.1, 1, (tokens, k)), jnp.float32),
      indices=jnp.asarray(rng.integers(0, n_experts, (tokens, k)), jnp.int32))


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.ones((2, 3, 24))), "x must have rank 2"),
    (dict(up=jnp.ones((16, 25))), "same shape"),
    (dict(up=jnp.ones((16, 20)), down=jnp.ones((16, 20))), "hidden size mismatch"),
    (dict(weights=jnp.ones((11, 4))), r"weights and indices must both be \(T, k\)"),
    (dict(indices=jnp.zeros((11, 3), jnp.int16)),
     "indices must be int32"),
    (dict(indices=jnp.full((11, 3), 16, jnp.int32)), r"must lie in \[0, 16\)"),
    (dict(indices=jnp.full((11, 3), -1, jnp.int32)), r"must lie in \[0, 16\)"),
    (dict(x=jnp.ones((11, 24), jnp.int32)), "x must be a floating-point array"),
])
def test_atomic_experts_rejects_bad_inputs(change, match):
  args = make_inputs() | change
  with pytest.raises((ValueError, TypeError), match=match):
    ops.atomic_experts(**args)


def test_swiglu_needs_its_gate_table_and_runs_on_xla():
  args = make_inputs()
  gate = args["up"] * 0.5 + 0.1
  with pytest.raises(ValueError, match="gate must be given for activation 'swiglu'"):
    ops.atomic_experts(**args, activation="swiglu")
  with pytest.raises(ValueError, match="and only then"):
    ops.atomic_experts(**args, gate=gate)
  with pytest.raises(ValueError, match="gate must have the shape of up"):
    ops.atomic_experts(**args, activation="swiglu", gate=gate[:, :5])
  with pytest.raises(NotImplementedError, match="use impl='xla'"):
    ops.atomic_experts(**args, activation="swiglu", gate=gate, impl="pallas")
  y = ops.atomic_experts(**args, activation="swiglu", gate=gate)
  want = bf.atomic_experts_swiglu(*(np.asarray(args[n]) for n in ("x", "up", "down")),
                                  np.asarray(gate), np.asarray(args["weights"]),
                                  np.asarray(args["indices"]))
  assert bf.rel_err(y, want) < 1e-5


def test_atomic_experts_rejects_unknown_activation_and_impl():
  with pytest.raises(ValueError, match="activation must be one of"):
    ops.atomic_experts(**make_inputs(), activation="tanh")
  with pytest.raises(ValueError, match="impl must be one of"):
    ops.atomic_experts(**make_inputs(), impl="cuda")


@pytest.mark.parametrize("lx,ly,k,match", [
    (np.zeros((4, 3)), np.zeros((5, 3)), 2, "same number of tokens"),
    (np.zeros((4,)), np.zeros((4, 3)), 2, "lx must have rank 2"),
    (np.zeros((4, 3)), np.zeros((4, 3)), 10, r"1 <= k <= n_x \* n_y = 9"),
    (np.zeros((4, 3)), np.zeros((4, 3)), 0, r"1 <= k"),
    (np.zeros((4, 3)), np.zeros((4, 3)), 2.0, "k must be a Python int"),
])
def test_cartesian_topk_rejects_bad_inputs(lx, ly, k, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ops.cartesian_topk(jnp.asarray(lx, jnp.float32), jnp.asarray(ly, jnp.float32), k)


def test_xla_path_under_jit_and_grad_matches_brute_force():
  args = make_inputs(tokens=13, d=20, n_experts=9, k=4, seed=1)
  idx = args.pop("indices")
  dy = jnp.asarray(np.random.default_rng(2).standard_normal((13, 20)), jnp.float32)

  @jax.jit
  def loss(x, up, down, weights):
    return jnp.sum(ops.atomic_experts(x, up, down, weights, idx, impl="xla") * dy)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args.values())
  want = bf.atomic_experts_grads(*(np.asarray(a) for a in args.values()), np.asarray(idx),
                                 np.asarray(dy))
  for g, w in zip(grads, want):
    assert bf.rel_err(g, w) < 1e-5


@pytest.mark.parametrize("tokens,k", [(0, 3), (5, 0)])
def test_atomic_experts_without_pairs(tokens, k):
  """No tokens (or k = 0): zeros out and zero gradients on every path, no kernel launched
  on an empty grid."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((tokens, 16)), jnp.float32)
  up, down = (jnp.asarray(rng.standard_normal((10, 16)), jnp.float32) for _ in range(2))
  weights = jnp.ones((tokens, k), jnp.float32)
  idx = jnp.zeros((tokens, k), jnp.int32)
  for impl in ("xla", "pallas"):
    loss = lambda *a, impl=impl: ops.atomic_experts(*a, idx, impl=impl).sum()
    y = ops.atomic_experts(x, up, down, weights, idx, impl=impl)
    assert y.shape == x.shape and not np.any(np.asarray(y))
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(x, up, down, weights)
    for g, a in zip(grads, (x, up, down, weights)):
      assert g.shape == a.shape and not np.any(np.asarray(g))


def test_cartesian_topk_under_jit():
  rng = np.random.default_rng(3)
  lx = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((7, 5)), jnp.float32))
  ly = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((7, 5)), jnp.float32))
  scores, idx = jax.jit(lambda a, b: ops.cartesian_topk(a, b, 6, impl="xla"))(lx, ly)
  want_s, want_i = bf.full_topk(np.asarray(lx), np.asarray(ly), 6)
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  np.testing.assert_allclose(np.asarray(scores), want_s, rtol=0, atol=0)
