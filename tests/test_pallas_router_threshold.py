"""The threshold-search top-k kernels (k in the thousands) against float64 brute force.

Every test runs the kernel code in Pallas interpret mode on CPU, and compiled on a GPU
when one is present (on a GPU host: `python -m pytest --noconftest -m gpu
tests/test_pallas_router_threshold.py`).
Indices and scores must match `brute_force.full_topk` bit for bit; sorted=False must
return the same set in the documented kernel order (rows ascending, then descending ly,
then ascending column), and `threshold`'s (theta, cut) must describe exactly that set.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import ops, reference
from omnimoe.pallas import router_threshold, router_topk
from tests import bounds, brute_force as bf
from tests.triton_lowering import triton_kernels

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=[
             pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")])]


def kernel_order(ly, idx):
  """Each row of idx rearranged into the kernel's unsorted order: rows ascending, then
  ly descending, then column ascending."""
  n_y = ly.shape[1]
  out = np.empty_like(idx)
  for t, ids in enumerate(idx):
    rows, cols = ids // n_y, ids % n_y
    out[t] = ids[np.lexsort((cols, -ly[t, cols].astype(np.float64), rows))]
  return out


def members(lx, ly, theta, cut):
  """(T, N) boolean: expert e kept by the rule s > theta or (s == theta and e <= cut)."""
  sums = (lx[:, :, None] + ly[:, None, :]).reshape(lx.shape[0], -1)
  theta, cut = np.asarray(theta)[:, None], np.asarray(cut)[:, None]
  return (sums > theta) | ((sums == theta) & (np.arange(sums.shape[1]) <= cut))


def check_exact(lx, ly, k, interpret, sorted_too=True, config=router_threshold.ThresholdConfig()):
  """The kernel order (and the sorted one), and the membership rule, against the float64
  brute force. (sorted=True is sorted=False plus an XLA sort: not every test needs it.)"""
  want_s, want_i = bf.full_topk(lx, ly, k)
  a, b = jnp.asarray(lx), jnp.asarray(ly)
  if sorted_too:
    scores, idx = router_threshold.cartesian_topk(a, b, k, config=config, interpret=interpret)
    assert scores.dtype == jnp.float32 and idx.dtype == jnp.int32
    assert scores.shape == idx.shape == (lx.shape[0], k)
    np.testing.assert_array_equal(np.asarray(idx), want_i)
    np.testing.assert_array_equal(np.asarray(scores, np.float64), want_s)

  scores, idx = router_threshold.cartesian_topk(a, b, k, sorted=False, config=config,
                                                interpret=interpret)
  order = kernel_order(ly, want_i)
  np.testing.assert_array_equal(np.asarray(idx), order)
  sums = (lx[:, :, None] + ly[:, None, :]).reshape(lx.shape[0], -1)
  np.testing.assert_array_equal(np.asarray(scores), np.take_along_axis(sums, order, 1))

  theta, cut = router_threshold.threshold(a, b, k, config=config, interpret=interpret)
  assert theta.dtype == jnp.float32 and cut.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(theta, np.float64), want_s[:, -1])  # k-th best
  want = np.zeros(sums.shape, bool)
  np.put_along_axis(want, want_i, True, axis=1)
  np.testing.assert_array_equal(members(lx, ly, theta, cut), want)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("tokens,n_x,n_y,k,quantum", [
    (7, 10, 10, 1, None), (5, 10, 10, 100, 0.125),        # k = 1, k = N with ties
    (6, 17, 17, 72, None), (4, 6, 9, 20, 0.25),            # k ~ N/4; rectangular
    (3, 9, 20, 45, 0.5), (5, 1, 13, 6, None),              # rectangular; one row
    (3, 320, 320, 4096, None), (3, 320, 320, 512, 0.0625),  # the paper's grid
    (2, 32, 16, 512, None),                                # k = N, n a power of two
])
def test_matches_full_topk(tokens, n_x, n_y, k, quantum, interpret):
  rng = np.random.default_rng(tokens * 1000 + n_x * 10 + k)
  lx, ly = bf.log_probs(rng, tokens, n_x, quantum), bf.log_probs(rng, tokens, n_y, quantum)
  check_exact(lx, ly, k, interpret)


@pytest.mark.parametrize("interpret", MODES)
def test_other_launch_shapes(interpret):
  """Four tokens per threshold program, one per emit program, 16 slots per emit step."""
  rng = np.random.default_rng(15)
  lx, ly = bf.log_probs(rng, 7, 10, 0.25), bf.log_probs(rng, 7, 12, 0.25)
  config = router_threshold.ThresholdConfig(block_t=4, emit_block_t=1, emit_slots=16)
  check_exact(lx, ly, 50, interpret, config=config)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("n_x,n_y,k", [(10, 17, 41), (17, 10, 91), (32, 32, 500)])
def test_sums_that_round_together(n_x, n_y, k, interpret):
  rng = np.random.default_rng(n_x * n_y + k)
  lx, ly = bf.rounding_ties(rng, 4, n_x, n_y)
  # The data does what it is for: in some token's cut row, the first tied columns in
  # sorted-ly order are not the kept ones (the tied columns with the smallest ids).
  scores, idx = bf.full_topk(lx, ly, k)
  out_of_order = []
  for t in range(lx.shape[0]):
    cut = idx[t][scores[t] == scores[t, -1]].max()
    row, j = divmod(cut, n_y)
    tied = np.flatnonzero(lx[t, row] + ly[t] == scores[t, -1])
    first = tied[np.argsort(-ly[t, tied], kind="stable")][:np.sum(tied <= j)]
    out_of_order.append(set(first) != set(tied[tied <= j]))
  assert any(out_of_order), "crafted data lost its out-of-order ties"
  check_exact(lx, ly, k, interpret, sorted_too=False)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("k", [20, 144])
def test_minus_infinity_and_signed_zero(k, interpret):
  """-inf ranks below every finite sum (and theta may be -inf); -0.0 ties with +0.0."""
  rng = np.random.default_rng(11)
  lx, ly = bf.log_probs(rng, 5, 12, 0.5), bf.log_probs(rng, 5, 12, 0.5)
  lx[:, ::3] = -np.inf
  lx[0, :] = -np.inf
  ly[1, :4] = -0.0
  ly[1, 4:6] = 0.0  # the grid's zeros are -0.0 (-quantum * 0)
  ly[2, 5:] = -np.inf
  check_exact(lx, ly, k, interpret)


def test_exact_count_closes_the_search_in_the_last_row():
  """A midpoint that exactly k sums reach ends the bisection early. Here it does so from
  above the 2nd best sum, so eq counts sums that are not ties, and the k-th best sum is
  in the last row at column 0: the cut must stay in that row (before the fix it pointed
  one row past it and the emit stored out of range)."""
  lx = np.array([[-3.0, -0.5]], np.float32)
  ly = np.array([[0.48, 0.5, 0.49, -2.0, -4.0]], np.float32)
  with bounds.checked():
    check_exact(lx, ly, 3, True)


@pytest.mark.parametrize("interpret", MODES)
def test_bf16_inputs_match_reference(interpret):
  rng = np.random.default_rng(12)
  lx, ly = (jnp.asarray(bf.log_probs(rng, 4, 24), jnp.bfloat16) for _ in range(2))
  got = router_threshold.cartesian_topk(lx, ly, 300, interpret=interpret)
  want = reference.cartesian_topk(lx, ly, 300)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_ops_dispatch_and_gradients():
  """ops(impl="pallas") with k > MAX_KERNEL_K runs this kernel (interpreted off-GPU), in
  either order; the scores differentiate like the reference's (the cotangent is a
  function of the expert id, so the loss does not depend on the order)."""
  rng = np.random.default_rng(13)
  lx, ly = (jnp.asarray(bf.log_probs(rng, 5, 16)) for _ in range(2))
  k = router_topk.MAX_KERNEL_K + 22
  want_i = bf.full_topk(np.asarray(lx), np.asarray(ly), k)[1]
  for sort, want in [(True, want_i), (False, kernel_order(np.asarray(ly), want_i))]:
    _, idx = ops.cartesian_topk(lx, ly, k, sorted=sort, impl="pallas")
    np.testing.assert_array_equal(np.asarray(idx), want)

  weight = jnp.asarray(rng.standard_normal(16 * 16), jnp.float32)

  def grad(impl):
    def loss(a, b):
      scores, idx = ops.cartesian_topk(a, b, k, sorted=False, impl=impl)
      return jnp.sum(scores * weight[idx])
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  for got, want in zip(grad("pallas")(lx, ly), grad("xla")(lx, ly)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)  # order


@pytest.mark.parametrize("bad", [None, 1, "yes"])
def test_sorted_must_be_a_bool(bad):
  lx = jnp.zeros((2, 4), jnp.float32) - 1.0
  with pytest.raises(TypeError, match="sorted must be a bool"):
    ops.cartesian_topk(lx, lx, 3, sorted=bad)


def test_bad_config_and_k():
  lx = jnp.asarray(bf.log_probs(np.random.default_rng(14), 2, 4))
  with pytest.raises(ValueError, match="power of two"):
    router_threshold.threshold(lx, lx, 3, config=router_threshold.ThresholdConfig(block_t=3))
  with pytest.raises(ValueError, match="ThresholdConfig.num_warps must be a power of two"):
    router_threshold.threshold(lx, lx, 3, config=router_threshold.ThresholdConfig(num_warps=3))
  with pytest.raises(ValueError, match="ThresholdConfig.emit_num_warps must be a power"):
    router_threshold.cartesian_topk(
        lx, lx, 3, config=router_threshold.ThresholdConfig(emit_num_warps=6))
  with pytest.raises(ValueError, match="1 <= k <= n_x \\* n_y = 16"):
    router_threshold.cartesian_topk(lx, lx, 17)


@pytest.mark.parametrize("block_t,n_x,n_y,k", [
    (2, 320, 320, 4096), (1, 10, 17, 129), (4, 6, 9, 54)])
def test_kernels_lower_to_triton(block_t, n_x, n_y, k):
  """Both kernels lower to Triton IR for CUDA, which runs on CPU too: catches what interpret
  mode accepts and the Triton lowering lacks (e.g. slicing a register array)."""
  config = router_threshold.ThresholdConfig(block_t=block_t, emit_block_t=block_t)
  shapes = [jax.ShapeDtypeStruct((7, n), jnp.float32) for n in (n_x, n_y)]
  for kernels, fn in [(2, lambda a, b: router_threshold.cartesian_topk(
                          a, b, k, sorted=False, config=config, interpret=False)),
                      (1, lambda a, b: router_threshold.threshold(
                          a, b, k, config=config, interpret=False))]:
    assert triton_kernels(fn, *shapes) == kernels


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("k,quantum", [(512, None), (4096, None), (4096, 0.0625)])
def test_headline_grid_on_gpu(k, quantum):
  """N = 320^2, k = 512 / 4096, 67 tokens (two-token programs with a ragged end)."""
  rng = np.random.default_rng(k)
  lx, ly = bf.log_probs(rng, 67, 320, quantum), bf.log_probs(rng, 67, 320, quantum)
  check_exact(lx, ly, k, interpret=False)
