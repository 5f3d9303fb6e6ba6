"""The public ops: boundary validation and the XLA path under jit and grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import ops
from tests import brute_force as bf
from tests.conftest import REPO


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
    (dict(unique_indices=jnp.array(True)), "unique_indices must be a bool"),
    (dict(unique_indices=1), "unique_indices must be a bool"),
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


def test_gate_logits_keep_float32_logits_and_run_a_bf16_backward():
  """bf16 operands, float32 logits (not rounded to bf16), the backward of a bf16 layer."""
  x = 3.0 * jax.random.normal(jax.random.key(5), (37, 20)).astype(jnp.bfloat16)
  gate = jax.random.normal(jax.random.key(6), (20, 9))
  probe = jax.random.normal(jax.random.key(7), (37, 9))  # a non-constant cotangent
  logits, vjp = jax.vjp(lambda x, g: ops.gate_logits(x, g, jnp.bfloat16), x, gate)
  x32, gate16 = x.astype(jnp.float32), gate.astype(jnp.bfloat16).astype(jnp.float32)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, x32 @ gate16, rtol=1e-6, atol=1e-6)
  rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
  assert np.any(np.asarray(logits) != np.asarray(rounded))
  dx, dgate = vjp(probe)
  probe16 = probe.astype(jnp.bfloat16).astype(jnp.float32)
  assert dx.dtype == jnp.bfloat16 and dgate.dtype == jnp.float32
  np.testing.assert_allclose(dx.astype(jnp.float32), probe16 @ gate16.T, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dgate, x32.T @ probe16, rtol=1e-2, atol=1e-2)  # bf16-rounded
  dots = [e for e in jax.make_jaxpr(vjp)(probe).eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  # float32 operands: plain autodiff.
  want = jax.vjp(lambda x, g: x @ g, x32, gate)[1](probe)
  got = jax.vjp(lambda x, g: ops.gate_logits(x, g, jnp.float32), x32, gate)[1](probe)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x,gate,dtype,match", [
    (jnp.ones((2, 3, 4)), jnp.ones((4, 5)), jnp.float32, "x must have rank 2"),
    (jnp.ones((3, 4)), jnp.ones((5, 5)), jnp.float32, "disagree on d"),
    (jnp.ones((3, 4), jnp.int32), jnp.ones((4, 5)), jnp.float32, "x must be a floating"),
    (jnp.ones((3, 4)), jnp.ones((4, 5)), jnp.int8, "dtype must be a floating"),
])
def test_gate_logits_rejects_bad_input(x, gate, dtype, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ops.gate_logits(x, gate, dtype)


def test_readme_ops_example_runs():
  """README's "The ops" example, as written there, runs and gives what its comments say."""
  import os
  import re
  with open(os.path.join(REPO, "README.md")) as f:
    (block,) = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  scope = {}
  exec(block, scope)  # noqa: S102 - our own README
  T, d, k = scope["T"], scope["d"], scope["k"]
  assert scope["y"].shape == (T, d) and scope["idx"].shape == (T, k)
  assert scope["idx"].dtype == jnp.int32 and np.all(np.diff(scope["scores"], axis=1) <= 0)
  assert np.all(np.isfinite(scope["y"])) and np.any(scope["y"] != 0)
