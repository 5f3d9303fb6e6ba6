"""The fused router top-k kernel against float64 brute force and the reference.

Every test runs the kernel code in Pallas interpret mode on CPU, and compiled on a GPU
when one is present (`-m gpu`; on a GPU host without the trainer's dependencies run
`python -m pytest --noconftest -m gpu tests/test_pallas_*.py`).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import ops, reference
from omnimoe.pallas import router_topk
from tests import bounds
from tests import brute_force as bf
from tests.triton_lowering import triton_kernels

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=[
             pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")])]


def check_exact(lx, ly, k, interpret, config=router_topk.RouterConfig()):
  scores, idx = router_topk.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), k,
                                           config=config, interpret=interpret)
  want_s, want_i = bf.full_topk(lx, ly, k)
  assert scores.dtype == jnp.float32 and idx.dtype == jnp.int32
  assert scores.shape == idx.shape == (lx.shape[0], k)
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  np.testing.assert_array_equal(np.asarray(scores, np.float64), want_s)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("axis_topk", router_topk.AXIS_TOPKS)
@pytest.mark.parametrize("merge", router_topk.MERGES)
@pytest.mark.parametrize("tokens,n_x,n_y,k,quantum", [
    (37, 3, 3, 1, None), (37, 3, 3, 9, 0.125),       # k = 1, k = N
    (13, 10, 10, 7, 0.125), (5, 32, 32, 32, None),   # ties; k = n
    (19, 17, 17, 40, None), (11, 6, 9, 10, 0.25),    # k > n; rectangular grid
    (9, 64, 64, 16, 0.125), (7, 256, 256, 32, None),  # N = 65536, k = 32
])
def test_matches_full_topk(tokens, n_x, n_y, k, quantum, merge, axis_topk, interpret):
  rng = np.random.default_rng(tokens * 1000 + n_x * 10 + k)
  lx, ly = bf.log_probs(rng, tokens, n_x, quantum), bf.log_probs(rng, tokens, n_y, quantum)
  check_exact(lx, ly, k, interpret, router_topk.RouterConfig(
      max_kernel_k=max(k, 32), merge=merge, axis_topk=axis_topk))


@pytest.mark.parametrize("n", [16, 12])  # 12: the row loads' lanes past n are clamped
def test_loads_stay_in_bounds(n):
  """tests/bounds.py over the fused kernel, both merges (the staircase and its fallback):
  every address in range, masked lanes included (the kernels' clamp-and-mask rule)."""
  rng = np.random.default_rng(n)
  lx, ly = bf.log_probs(rng, 5, n, 0.25), bf.log_probs(rng, 5, n, 0.25)
  with bounds.checked():
    for axis_topk in router_topk.AXIS_TOPKS:
      check_exact(lx, ly, 12, True, router_topk.RouterConfig(merge="grid", axis_topk=axis_topk))
      check_exact(lx, ly, 32, True, router_topk.RouterConfig(merge="staircase",
                                                             axis_topk=axis_topk))


@pytest.mark.parametrize("k,n_x,n_y", [(1, 3, 3), (7, 4, 9), (32, 32, 32), (40, 17, 17),
                                       (150, 2, 100)])
def test_staircase_dominates_every_other_cell(k, n_x, n_y):
  """Every cell of the k_x x k_y grid outside the staircase is dominated by >= k staircase
  cells (what makes the staircase merge exact up to ties), and the border holds, per row,
  the first cell past the staircase."""
  kx, ky = min(k, n_x), min(k, n_y)
  rows, cols, border_rows, border_cols = router_topk.staircase(kx, ky, k)
  cells = {(int(i), int(j)) for i, j in zip(rows, cols) if i >= 0}
  assert len(cells) >= k and all(0 <= i < kx and 0 <= j < ky for i, j in cells)
  for i in range(kx):
    for j in range(ky):
      if (i, j) not in cells:
        assert sum(a <= i and b <= j for a, b in cells) >= k
  border = {(int(i), int(j)) for i, j in zip(border_rows, border_cols) if i >= 0}
  assert border == {(i, min(j for j in range(ky) if (i, j) not in cells)) for i in range(kx)
                    if any((i, j) not in cells for j in range(ky))}


def staircase_positions(lx, ly, idx):
  """(T, k) of (i + 1)(j + 1) for each chosen expert: i, j its row's and column's places in
  the axes' best-first orders (ties: lower id first)."""
  place = lambda v: np.argsort(np.lexsort((np.arange(v.shape[1])[None].repeat(len(v), 0),
                                           -v.astype(np.float64)), axis=1), axis=1)
  n_y = ly.shape[1]
  px, py = place(lx), place(ly)
  return np.stack([(px[t, idx[t] // n_y] + 1) * (py[t, idx[t] % n_y] + 1)
                   for t in range(len(idx))])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("axis_topk", router_topk.AXIS_TOPKS)
@pytest.mark.parametrize("seed,shape", [(0, (10, 8, 17)), (3, (10, 3, 7)), (7, (11, 8, 22))])
def test_staircase_merge_falls_back_on_ties(seed, shape, axis_topk, interpret):
  """Sums that round together (lx near -1e8, float32 spacing 8): some token's top k holds
  a cell outside the staircase that enters by the tie rule, which only the whole-grid
  merge finds; the staircase merge must notice (its border check) and fall back, with the
  picks in registers (arg-max rounds) or read back from memory (bisection). (Seeds found
  by search: without the fallback each of them fails.)"""
  rng = np.random.default_rng(seed)
  n_x, n_y = int(rng.integers(3, 12)), int(rng.integers(3, 12))
  k = int(rng.integers(3, min(32, n_x * n_y)))
  assert (n_x, n_y, k) == shape
  lx, ly = bf.rounding_ties(rng, 4, n_x, n_y, levels=4)
  _, want_i = bf.full_topk(lx, ly, k)
  assert np.any(staircase_positions(lx, ly, want_i) > k)  # the data does what it is for
  check_exact(lx, ly, k, interpret, router_topk.RouterConfig(merge="staircase",
                                                             axis_topk=axis_topk))


@pytest.mark.parametrize("merge", router_topk.MERGES)
def test_rounding_ties_outside_the_candidates_follow_the_reference(merge):
  """The product-key search's one caveat (reference.cartesian_topk): a sum from outside
  the k x k candidates that rounds onto the k-th sum and wins its tie by a lower id is
  missed. The kernel keeps the reference's answer there (not the full grid's)."""
  lx, ly = bf.rounding_ties(np.random.default_rng(5), 4, 7, 7)
  got = router_topk.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), 3, interpret=True,
                                   config=router_topk.RouterConfig(merge=merge))
  want = reference.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), 3)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert not np.array_equal(np.asarray(got[1]), bf.full_topk(lx, ly, 3)[1])


@pytest.mark.parametrize("axis_topk", router_topk.AXIS_TOPKS)
@pytest.mark.parametrize("merge", router_topk.MERGES)
@pytest.mark.parametrize("n_x,n_y,k", [(256, 256, 32), (17, 17, 40), (64, 64, 16), (6, 9, 10)])
def test_kernel_lowers_to_triton(merge, axis_topk, n_x, n_y, k):
  """The kernel (every merge, the staircase's fallback branch included; axes sharing one
  loop or not; both per-axis methods, the barrier of "bisect" included) lowers to Triton
  IR for CUDA, on CPU too: catches what interpret mode accepts and the Triton lowering
  lacks (e.g. slicing a register array)."""
  config = router_topk.RouterConfig(merge=merge, max_kernel_k=max(k, 32), axis_topk=axis_topk)
  fn = lambda a, b: router_topk.cartesian_topk(a, b, k, config=config, interpret=False)
  assert triton_kernels(fn, *[jax.ShapeDtypeStruct((7, n), jnp.float32) for n in (n_x, n_y)]) == 1


def test_bad_config_is_refused():
  lx = jnp.zeros((2, 64), jnp.float32)
  for k in (3, router_topk.MAX_KERNEL_K + 1):  # also where the fused kernel would not run
    with pytest.raises(ValueError, match="RouterConfig.merge must be one of"):
      router_topk.cartesian_topk(lx, lx, k, config=router_topk.RouterConfig(merge="heap"),
                                 interpret=True)
  with pytest.raises(ValueError, match="RouterConfig.axis_topk must be 'auto' or one of"):
    router_topk.RouterConfig(axis_topk="sort")
  for field, value in [("block_t", -1), ("block_t", 3), ("num_warps", 6)]:
    with pytest.raises(ValueError, match=rf"RouterConfig.{field} must be 0 \(auto\) or a "
                                         rf"power of two, got {value}"):
      router_topk.RouterConfig(**{field: value})


@pytest.mark.parametrize("k", [0, 5, router_topk.MAX_KERNEL_K + 1])
def test_k_outside_the_grid_is_refused(k):
  """Called directly too (a 2 x 2 grid with k = 5 gave NaN scores and a repeated id)."""
  lx = jnp.zeros((3, 2), jnp.float32)
  with pytest.raises(ValueError, match=rf"1 <= k <= n_x \* n_y = 4, got {k}"):
    router_topk.cartesian_topk(lx, lx, k, interpret=True)


def test_threshold_config_reaches_the_threshold_search():
  """k > max_kernel_k runs router_threshold with RouterConfig.threshold (checked there)."""
  from omnimoe.pallas import router_threshold
  rng = np.random.default_rng(12)
  lx, ly = bf.log_probs(rng, 5, 12, 0.25), bf.log_probs(rng, 5, 10, 0.25)
  k = router_topk.MAX_KERNEL_K + 9
  launch = router_threshold.ThresholdConfig(block_t=2, emit_block_t=2, emit_slots=16)
  with bounds.checked():  # every address the threshold and emit kernels take is in range
    check_exact(lx, ly, k, True, router_topk.RouterConfig(threshold=launch))
  bad = router_topk.RouterConfig(threshold=router_threshold.ThresholdConfig(emit_slots=24))
  with pytest.raises(ValueError, match="ThresholdConfig.emit_slots must be a power of two"):
    router_topk.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), k, config=bad, interpret=True)


def test_auto_config_picks_the_measured_merge_and_axis_topk():
  """'auto' merges the staircase (one token a program) from STAIRCASE_MIN_K on, the whole
  grid (two tokens) below; it bisects rows from BISECT_MIN_N on, takes arg-max rounds
  below; explicit fields are kept."""
  k, n = router_topk.STAIRCASE_MIN_K, router_topk.BISECT_MIN_N
  auto = router_topk.RouterConfig()
  assert (auto.resolved(k, n).merge, auto.resolved(k, n).block_t) == ("staircase", 1)
  assert (auto.resolved(k - 1, n).merge, auto.resolved(k - 1, n).block_t) == ("grid", 2)
  assert auto.resolved(k, n).axis_topk == "bisect"
  assert auto.resolved(k, n - 1).axis_topk == "argmax"
  fixed = router_topk.RouterConfig(merge="grid", block_t=4, axis_topk="argmax")
  assert fixed.resolved(k, n) == fixed


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("axis_topk", router_topk.AXIS_TOPKS)
def test_minus_infinity_and_signed_zero(axis_topk, interpret):
  """Masked logits (-inf) rank below every finite score; -0.0 ties with +0.0."""
  rng = np.random.default_rng(7)
  lx, ly = bf.log_probs(rng, 6, 12, 0.5), bf.log_probs(rng, 6, 12, 0.5)
  lx[:, ::3] = -np.inf
  lx[0, :] = -np.inf
  ly[1, :4] = -0.0
  ly[1, 4:6] = 0.0  # the grid's zeros are -0.0 (-quantum * 0)
  check_exact(lx, ly, 20, interpret, router_topk.RouterConfig(axis_topk=axis_topk))


@pytest.mark.parametrize("interpret", MODES)
def test_million_experts_and_bf16_inputs(interpret):
  rng = np.random.default_rng(8)
  lx, ly = bf.log_probs(rng, 3, 1024), bf.log_probs(rng, 3, 1024)
  for axis_topk in router_topk.AXIS_TOPKS:
    check_exact(lx, ly, 32, interpret, router_topk.RouterConfig(axis_topk=axis_topk))
  lx16, ly16 = (jnp.asarray(a, jnp.bfloat16) for a in (lx, ly))
  got = router_topk.cartesian_topk(lx16, ly16, 8, interpret=interpret)
  want = reference.cartesian_topk(lx16, ly16, 8)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("interpret", MODES)
def test_four_million_experts(interpret):
  """n = 2048 per axis (N = 2^22; rows of 2048 lanes, the axes in separate loops), k = 32
  (auto: the staircase merge): a token of random scores and one of coarse ties (~65k
  cells share the top score, so the border check falls back to the whole grid and the
  tie rule picks the lowest ids)."""
  rng = np.random.default_rng(2048)
  lx, ly = (np.concatenate([bf.log_probs(rng, 1, 2048), bf.log_probs(rng, 1, 2048, 0.125)])
            for _ in range(2))
  for axis_topk in router_topk.AXIS_TOPKS:
    check_exact(lx, ly, 32, interpret, router_topk.RouterConfig(axis_topk=axis_topk))


def test_large_k_falls_back_to_reference():
  rng = np.random.default_rng(9)
  lx, ly = bf.log_probs(rng, 4, 12), bf.log_probs(rng, 4, 12)
  k = router_topk.MAX_KERNEL_K + 2
  check_exact(lx, ly, k, interpret=True)


def test_fused_kernel_past_its_dispatch_bound(monkeypatch):
  """RouterConfig.max_kernel_k moves the bound (the crossover benchmark times the fused
  kernel beyond MAX_KERNEL_K): k = MAX_KERNEL_K + 9 then runs fused, still exact."""
  from omnimoe.pallas import router_threshold

  def refuse(*args, **kwargs):
    raise AssertionError("dispatched to the threshold search")

  monkeypatch.setattr(router_threshold, "cartesian_topk", refuse)
  rng = np.random.default_rng(11)
  lx, ly = bf.log_probs(rng, 5, 12, 0.25), bf.log_probs(rng, 5, 10, 0.25)
  k = router_topk.MAX_KERNEL_K + 9
  check_exact(lx, ly, k, True, router_topk.RouterConfig(max_kernel_k=k))
  with pytest.raises(AssertionError, match="threshold"):
    check_exact(lx, ly, k, True)


def test_gradients_and_jit_through_ops():
  """ops(impl="pallas") off-GPU interprets the kernel; scores differentiate like the
  reference's (through the chosen lx[i] + ly[j])."""
  rng = np.random.default_rng(10)
  lx, ly = (jnp.asarray(bf.log_probs(rng, 7, 20)) for _ in range(2))
  cot = jnp.asarray(rng.standard_normal((7, 12)), jnp.float32)

  def loss(impl):
    return jax.jit(jax.grad(
        lambda a, b: jnp.sum(ops.cartesian_topk(a, b, 12, impl=impl)[0] * cot),
        argnums=(0, 1)))

  for got, want in zip(loss("pallas")(lx, ly), loss("xla")(lx, ly)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)  # summation order
