"""The plain-jnp oracle against float64 NumPy brute force (full top-k, per-pair loops)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import reference
from tests import brute_force as bf


@pytest.mark.parametrize("tokens,n,k", [
    (37, 3, 1), (37, 3, 3), (37, 3, 9),     # N=9: k=1, k=n, k=N
    (13, 10, 7), (5, 32, 32), (19, 17, 40),  # awkward n, k = n, k > n
])
@pytest.mark.parametrize("quantum", [None, 0.125])
def test_cartesian_topk_matches_full_topk(tokens, n, k, quantum):
  rng = np.random.default_rng(tokens * 1000 + n * 10 + k)
  lx, ly = bf.log_probs(rng, tokens, n, quantum), bf.log_probs(rng, tokens, n, quantum)
  scores, idx = reference.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), k)
  want_s, want_i = bf.full_topk(lx, ly, k)
  assert scores.dtype == jnp.float32 and idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  np.testing.assert_array_equal(np.asarray(scores, np.float64), want_s)


@pytest.mark.parametrize("jit", [False, True])
def test_cartesian_topk_signed_zeros_tie(jit):
  """-0.0 and +0.0 are one score: the tie goes to the lower id, eager and under jit;
  -inf (masked logits) stays -inf (no NaN from the folding)."""
  lx = np.array([[-0.0, 0.0, -1.0], [0.0, -0.0, -0.0], [-np.inf, -1.0, -0.0]], np.float32)
  ly = np.array([[0.0, -2.0, -0.0], [-0.0, 0.0, -3.0], [-0.0, -np.inf, 0.0]], np.float32)
  topk = jax.jit(reference.cartesian_topk, static_argnums=2) if jit else reference.cartesian_topk
  for k in (1, 4, 9):
    scores, idx = topk(lx, ly, k)
    want_s, want_i = bf.full_topk(lx, ly, k)
    np.testing.assert_array_equal(np.asarray(idx), want_i)
    np.testing.assert_array_equal(np.asarray(scores, np.float64), want_s)
    assert not np.signbit(np.asarray(scores)[np.asarray(scores) == 0]).any()


def test_cartesian_topk_rectangular_grid():
  rng = np.random.default_rng(1)
  lx, ly = bf.log_probs(rng, 11, 6), bf.log_probs(rng, 11, 9)
  _, idx = reference.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), 10)
  np.testing.assert_array_equal(np.asarray(idx), bf.full_topk(lx, ly, 10)[1])


@pytest.mark.parametrize("max_elements", [1, 5 * 36])
def test_cartesian_topk_in_chunks_of_tokens(monkeypatch, max_elements):
  """Candidate grids past reference.MAX_ELEMENTS run in chunks of tokens (1 and 5 of 23
  here, the last chunk padded): the same exact top-k, and gradients reach lx and ly."""
  monkeypatch.setattr(reference, "MAX_ELEMENTS", max_elements)
  rng = np.random.default_rng(9)
  lx, ly = bf.log_probs(rng, 23, 11, 0.125), bf.log_probs(rng, 23, 6, 0.125)
  (scores, idx), vjp = jax.vjp(lambda a, b: reference.cartesian_topk(a, b, 6),
                               jnp.asarray(lx), jnp.asarray(ly))
  want_s, want_i = bf.full_topk(lx, ly, 6)
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  np.testing.assert_array_equal(np.asarray(scores, np.float64), want_s)
  dlx, dly = vjp((jnp.ones_like(scores), jnp.zeros_like(idx)))
  np.testing.assert_array_equal(np.asarray(dlx).sum(1), 6.0)
  np.testing.assert_array_equal(np.asarray(dly).sum(1), 6.0)


def test_cartesian_topk_million_experts():
  """N = 2^20 (n = 1024) with few tokens: exact against the full 2^20-way sort."""
  rng = np.random.default_rng(2)
  lx, ly = bf.log_probs(rng, 3, 1024), bf.log_probs(rng, 3, 1024)
  scores, idx = reference.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), 32)
  want_s, want_i = bf.full_topk(lx, ly, 32)
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  np.testing.assert_array_equal(np.asarray(scores, np.float64), want_s)


@pytest.mark.parametrize("tokens,d,n_experts,k", [
    (37, 96, 9, 1), (37, 96, 9, 9), (21, 64, 50, 5), (6, 40, 2 ** 20, 3),
])
def test_atomic_experts_matches_pair_loops(tokens, d, n_experts, k):
  rng = np.random.default_rng(tokens + d + k)
  x, up, down, w, idx, dy = bf.expert_inputs(rng, tokens, d, n_experts, k)
  y = reference.atomic_experts(*map(jnp.asarray, (x, up, down, w, idx)))
  assert y.dtype == jnp.float32 and y.shape == (tokens, d)
  assert bf.rel_err(y, bf.atomic_experts(x, up, down, w, idx)) < 1e-5


def test_atomic_experts_out_of_range_pairs_contribute_nothing():
  rng = np.random.default_rng(3)
  x, up, down, w, idx, dy = bf.expert_inputs(rng, 9, 24, 16, 4)
  idx[::2, 1] = -3
  idx[1::3, 2] = 16
  y = reference.atomic_experts(*map(jnp.asarray, (x, up, down, w, idx)))
  assert np.isfinite(np.asarray(y)).all()
  assert bf.rel_err(y, bf.atomic_experts(x, up, down, w, idx)) < 1e-5


def test_atomic_experts_bf16_accumulates_in_f32():
  rng = np.random.default_rng(4)
  x, up, down, w, idx, _ = bf.expert_inputs(rng, 33, 96, 40, 16)
  args = [jnp.asarray(a, jnp.bfloat16) for a in (x, up, down, w)] + [jnp.asarray(idx)]
  y = reference.atomic_experts(*args)
  assert y.dtype == jnp.bfloat16
  exact = bf.atomic_experts(*(np.asarray(a, np.float64) for a in args[:4]), idx)
  assert bf.rel_err(y, exact) < 1e-2


@pytest.mark.parametrize("tokens,d,n_experts,k", [(37, 96, 9, 9), (23, 40, 30, 1)])
def test_atomic_experts_gradients(tokens, d, n_experts, k):
  rng = np.random.default_rng(5 + k)
  x, up, down, w, idx, dy = bf.expert_inputs(rng, tokens, d, n_experts, k)
  idx[0, :] = idx[1, 0]  # one expert taken twice by a token and again by another
  _, vjp = jax.vjp(lambda *a: reference.atomic_experts(*a, jnp.asarray(idx)),
                   *map(jnp.asarray, (x, up, down, w)))
  got = vjp(jnp.asarray(dy))
  want = bf.atomic_experts_grads(x, up, down, w, idx, dy)
  for name, g, wnt in zip(("dx", "dup", "ddown", "dw"), got, want):
    assert bf.rel_err(g, wnt) < 1e-5, name


@pytest.mark.parametrize("max_elements", [23 * 40, 23 * 40 * 3])
def test_atomic_experts_in_chunks_of_pairs(monkeypatch, max_elements):
  """Gathers past reference.MAX_ELEMENTS run in chunks of pairs (1 and 3 of k = 7 here,
  the last chunk padded): same values and gradients, bad ids still dropped."""
  monkeypatch.setattr(reference, "MAX_ELEMENTS", max_elements)
  rng = np.random.default_rng(8)
  x, up, down, w, idx, dy = bf.expert_inputs(rng, 23, 40, 30, 7)
  idx[0, :] = idx[1, 0]
  idx[::4, 5] = -2
  idx[2, 6] = 30
  assert reference._pair_chunk(jnp.asarray(idx), 40) < 7
  y, vjp = jax.vjp(lambda *a: reference.atomic_experts(*a, jnp.asarray(idx)),
                   *map(jnp.asarray, (x, up, down, w)))
  assert bf.rel_err(y, bf.atomic_experts(x, up, down, w, idx)) < 1e-5
  want = bf.atomic_experts_grads(x, up, down, w, idx, dy)
  for name, g, wnt in zip(("dx", "dup", "ddown", "dw"), vjp(jnp.asarray(dy)), want):
    assert g.shape == wnt.shape and bf.rel_err(g, wnt) < 1e-5, name


def test_brute_force_gradients_match_finite_differences():
  """The float64 gradient formulas themselves, against central differences."""
  rng = np.random.default_rng(6)
  x, up, down, w, idx, dy = (a.astype(np.float64) if a.dtype != np.int32 else a
                             for a in bf.expert_inputs(rng, 5, 7, 4, 3))
  grads = bf.atomic_experts_grads(x, up, down, w, idx, dy)
  args = [x, up, down, w]
  for pos, grad in enumerate(grads):
    direction = rng.standard_normal(args[pos].shape)
    eps = 1e-6
    plus = [a + eps * direction if i == pos else a for i, a in enumerate(args)]
    minus = [a - eps * direction if i == pos else a for i, a in enumerate(args)]
    fd = (np.sum(dy * bf.atomic_experts(*plus, idx))
          - np.sum(dy * bf.atomic_experts(*minus, idx))) / (2 * eps)
    assert abs(fd - np.sum(grad * direction)) < 1e-6 * max(1.0, abs(fd))


def test_swiglu_experts_values_and_gradients():
  """The paper's 'SwiGLU' experts (third table `gate`): values against per-pair loops and
  each gradient's directional derivative against float64 central differences."""
  rng = np.random.default_rng(7)
  x, up, down, w, idx, dy = bf.expert_inputs(rng, 19, 40, 12, 5)
  gate = rng.standard_normal(up.shape).astype(np.float32)
  args = [x, up, down, gate, w]

  def f(x, up, down, gate, w):
    return reference.atomic_experts(x, up, down, w, jnp.asarray(idx), "swiglu", gate)

  assert bf.rel_err(f(*map(jnp.asarray, args)), bf.atomic_experts_swiglu(*args, idx)) < 1e-5
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * dy), argnums=range(5))(*map(jnp.asarray, args))
  for pos, grad in enumerate(grads):
    direction = rng.standard_normal(args[pos].shape)
    eps = 1e-5
    shifted = [[a.astype(np.float64) + sign * eps * direction if i == pos else a
                for i, a in enumerate(args)] for sign in (1, -1)]
    fd = (np.sum(dy * bf.atomic_experts_swiglu(*shifted[0], idx))
          - np.sum(dy * bf.atomic_experts_swiglu(*shifted[1], idx))) / (2 * eps)
    assert abs(fd - np.sum(np.asarray(grad, np.float64) * direction)) < 1e-4 * abs(fd), pos


def test_activations_are_the_functions_they_name():
  """Every path (oracle, XLA, kernels) reads `ACTIVATIONS`, so comparisons between them
  cannot catch a wrong entry: pin each against its closed form."""
  s = np.linspace(-6.0, 6.0, 49)
  closed = {"silu": s / (1 + np.exp(-s)),
            "gelu": 0.5 * s * (1 + np.tanh(np.sqrt(2 / np.pi) * (s + 0.044715 * s ** 3))),
            "relu": np.maximum(s, 0.0),
            "identity": s}
  assert set(closed) == set(reference.ACTIVATIONS)
  for name, want in closed.items():
    np.testing.assert_allclose(reference.ACTIVATIONS[name](jnp.asarray(s, jnp.float32)), want,
                               rtol=2e-6, atol=2e-6, err_msg=name)
