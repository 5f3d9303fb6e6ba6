"""The dense-regime atomic experts routed by the top-k's membership rule (theta, cut)
against float64 brute force on the pairs of the full N-way top-k, with weights
exp(score). The rule comes from the threshold router (Pallas interpret mode on CPU); the
op is XLA GEMMs, and the forward's and backward's grid passes as Pallas kernels
(interpret mode here, compiled in the GPU test) and as their XLA twins
(`RuleConfig.grid_pass`). Errors are ||got - want|| / ||want||: float32 < 1e-5,
bfloat16 < 1e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import reference
from omnimoe.pallas import expert_dense, expert_rule, router_threshold
from tests import brute_force as bf
from tests.test_pallas_experts import TOL
from tests.triton_lowering import triton_kernels


def rule_inputs(rng, tokens, d, n_x, n_y, k, dtype, quantum=None):
  """[x, up, down, lx, ly] (x and tables in `dtype`, log-probs float32), theta, cut from
  the threshold router, the brute-force pairs (scores float64, ids) and dy."""
  x, up, down, _, _, dy = bf.expert_inputs(rng, tokens, d, n_x * n_y, 1)
  lx, ly = (bf.log_probs(rng, tokens, n, quantum) for n in (n_x, n_y))
  theta, cut = router_threshold.threshold(jnp.asarray(lx), jnp.asarray(ly), k,
                                          interpret=True)
  args = [jnp.asarray(a, dtype) for a in (x, up, down)] + [jnp.asarray(lx), jnp.asarray(ly)]
  return args, (theta, cut), bf.full_topk(lx, ly, k), jnp.asarray(dy, dtype)


def brute_force(args, pairs, dy):
  """y and the gradients in x, up, down, lx, ly, per pair in float64."""
  x, up, down, lx, ly = (np.asarray(a, np.float64) for a in args)
  scores, idx = pairs
  w = np.exp(scores)
  y = bf.atomic_experts(x, up, down, w, idx)
  dx, dup, ddown, dw = bf.atomic_experts_grads(x, up, down, w, idx, np.asarray(dy, np.float64))
  dscore = dw * w  # d exp(s) / ds = exp(s), and s = lx[i] + ly[j]
  n_y = ly.shape[1]
  dlx, dly = np.zeros_like(lx), np.zeros_like(ly)
  for t in range(idx.shape[0]):
    np.add.at(dlx[t], idx[t] // n_y, dscore[t])
    np.add.at(dly[t], idx[t] % n_y, dscore[t])
  return y, (dx, dup, ddown, dlx, dly)


def check(args, rule, pairs, dy, config, tol, interpret=None):
  f = lambda *a: expert_rule.atomic_experts_rule(*a, *rule, config=config,
                                                 interpret=interpret)
  y, vjp = jax.vjp(f, *args)
  want_y, want_grads = brute_force(args, pairs, dy)
  for got in (y, f(*args)):  # under vjp (S kept) and the forward alone (S per block)
    assert got.dtype == args[0].dtype and got.shape == args[0].shape
    assert bf.rel_err(got, want_y) < tol
  for name, got, want, arg in zip(("dx", "dup", "ddown", "dlx", "dly"), vjp(dy), want_grads,
                                  args):
    assert got.dtype == arg.dtype and got.shape == arg.shape, name
    assert np.any(want != 0), name
    assert bf.rel_err(got, want) < tol, (name, bf.rel_err(got, want))


@pytest.mark.parametrize("tokens,d,n_x,n_y,k,rows,dtype,quantum", [
    (23, 96, 7, 9, 16, 0, jnp.float32, None),     # k = N / 4, one block
    (23, 96, 7, 9, 16, 8, jnp.float32, None),     # blocks of 8 rows, the last one padded
    (23, 96, 7, 9, 63, 8, jnp.float32, None),     # k = N
    (17, 64, 5, 6, 1, 0, jnp.float32, None),      # k = 1
    (17, 64, 8, 8, 20, 0, jnp.float32, 0.5),      # sums tie often: the cut decides
    (21, 64, 12, 10, 30, 0, jnp.bfloat16, None),  # one block: A kept, dU, dV in bf16
    (21, 64, 12, 10, 30, 8, jnp.bfloat16, 0.5),
    (19, 64, 5, 40, 50, 0, jnp.float32, None),    # 3 column chunks of 16, the last padded
    (13, 32, 3, 48, 20, 8, jnp.bfloat16, None),   # 3 column chunks of 16, none padded
    (9, 32, 16, 32, 100, 0, jnp.float32, None),   # tiles pad no row and no column: no masks
])
@pytest.mark.parametrize("grid_pass,row_walk", [
    ("kernel", "sorted"), ("kernel", "ranked"), ("xla", "sorted")])  # the XLA twin walks none
def test_values_and_gradients(tokens, d, n_x, n_y, k, rows, dtype, quantum, grid_pass,
                              row_walk):
  rng = np.random.default_rng(tokens + d + k + rows)
  args, rule, pairs, dy = rule_inputs(rng, tokens, d, n_x, n_y, k, dtype, quantum)
  config = expert_rule.RuleConfig(
      expert_dense.DenseConfig(max_block_elements=rows * n_x * n_y) if rows
      else expert_dense.DenseConfig(), grid_pass=grid_pass, row_walk=row_walk)
  check(args, rule, pairs, dy, config, TOL[dtype])


@pytest.mark.parametrize("grid_pass", expert_rule.GRID_PASSES)
def test_token_blocks_in_groups(grid_pass):
  """S kept whole per group of token blocks (`RuleConfig.max_group_elements`), each block
  reading its rows at an offset: 23 tokens in 6 blocks of 4 (the last padded), in groups
  of 4 and 2 blocks."""
  rng = np.random.default_rng(6)
  n_x, n_y = 6, 7
  args, rule, pairs, dy = rule_inputs(rng, 23, 48, n_x, n_y, 12, jnp.float32)
  config = expert_rule.RuleConfig(
      expert_dense.DenseConfig(max_block_elements=4 * n_x * n_y), grid_pass=grid_pass,
      max_group_elements=4 * 4 * n_x * n_y + 3)
  check(args, rule, pairs, dy, config, TOL[jnp.float32])


def test_rebuilt_grid_matches():
  """keep_grid=False (the backward rebuilds A from S and the rule) gives the same results."""
  rng = np.random.default_rng(4)
  args, rule, pairs, dy = rule_inputs(rng, 19, 96, 6, 7, 11, jnp.float32)
  check(args, rule, pairs, dy, expert_rule.RuleConfig(expert_dense.DenseConfig(keep_grid=False)),
        TOL[jnp.float32])


@pytest.mark.parametrize("keep", [True, False])
def test_second_order_matches_the_pairs_autodiff(keep):
  """A gradient penalty (a Hessian-vector product in x, the tables and the gates' log-probs,
  plus the gradient) through the rule op equals autodiff of the reference on the pairs
  (weights exp(lx[i] + ly[j]) at the brute-force top-k)."""
  rng = np.random.default_rng(8)
  n_y = 6
  args, rule, (_, ids), dy = rule_inputs(rng, 13, 40, 5, n_y, 9, jnp.float32)
  ids = jnp.asarray(ids, jnp.int32)
  probes = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args]
  config = expert_rule.RuleConfig(expert_dense.DenseConfig(keep_grid=keep))

  def by_pairs(x, up, down, lx, ly):
    scores = (jnp.take_along_axis(lx, ids // n_y, 1) + jnp.take_along_axis(ly, ids % n_y, 1))
    return reference.atomic_experts(x, up, down, jnp.exp(scores), ids, "silu")

  def hvp(fn):
    value_and_grads = jax.value_and_grad(lambda *a: jnp.vdot(fn(*a), dy), argnums=range(5))

    def penalised(*a):
      value, grads = value_and_grads(*a)
      return value + sum(jnp.vdot(g, v) for g, v in zip(grads, probes))

    return value_and_grads(*args), jax.grad(penalised, argnums=range(5))(*args)

  got = hvp(lambda *a: expert_rule.atomic_experts_rule(*a, *rule, config=config))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(hvp(by_pairs))):
    assert bf.rel_err(g, w) < 1e-5


def test_bad_shapes_are_refused():
  rng = np.random.default_rng(5)
  (x, up, down, lx, ly), (theta, cut), _, _ = rule_inputs(rng, 9, 32, 4, 5, 3, jnp.float32)
  with pytest.raises(ValueError, match=r"theta must have rank 1 \(T\), got shape \(9, 1\)"):
    expert_rule.atomic_experts_rule(x, up, down, lx, ly, theta[:, None], cut)
  with pytest.raises(ValueError, match="agree on T"):
    expert_rule.atomic_experts_rule(x, up, down, lx, ly[:8], theta, cut)
  with pytest.raises(ValueError, match=r"\(n_x n_y, d\) = \(20, 32\)"):
    expert_rule.atomic_experts_rule(x, up[:19], down[:19], lx, ly, theta, cut)
  with pytest.raises(ValueError, match="activation"):
    expert_rule.atomic_experts_rule(x, up, down, lx, ly, theta, cut, activation="swiglu")
  huge = expert_rule.RuleConfig(expert_dense.DenseConfig(max_block_elements=2 ** 40))
  shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
      ((2048, 8), jnp.bfloat16), ((2 ** 20, 8), jnp.bfloat16), ((2 ** 20, 8), jnp.bfloat16),
      ((2048, 1024), jnp.float32), ((2048, 1024), jnp.float32), ((2048,), jnp.float32),
      ((2048,), jnp.int32))]  # one block of 2048 tokens x 2^20 experts = 2^31 elements
  with pytest.raises(ValueError, match="int32 offsets"):
    jax.eval_shape(lambda *a: expert_rule.atomic_experts_rule(*a, config=huge), *shapes)


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_an_unrouted_experts_overflowed_score_stays_out(activation):
  """Every grid entry is scored, routed or not: an entry outside the top-k whose score
  overflows to inf must stay out (0 * inf = NaN), as in the reference, which never sees it."""
  rng = np.random.default_rng(6)
  (x, up, down, lx, ly), rule, pairs, dy = rule_inputs(rng, 3, 40, 5, 5, 2, jnp.float32)
  routed = np.unique(pairs[1])
  unrouted = next(e for e in range(25) if e not in routed)
  x, up = x.at[:].set(1e19), up.at[:].set(1e-21).at[unrouted].set(1e19)  # <x, up[e]> = inf
  y, vjp = jax.vjp(lambda *a: expert_rule.atomic_experts_rule(*a, *rule, activation=activation),
                   x, up, down, lx, ly)
  for got in (y, *vjp(dy)):
    assert jnp.all(jnp.isfinite(got))


def test_rule_config_is_checked():
  with pytest.raises(ValueError, match="grid_pass must be one of"):
    expert_rule.RuleConfig(grid_pass="triton")
  with pytest.raises(ValueError, match="RuleConfig.block_rows must be a power of two"):
    expert_rule.RuleConfig(block_rows=3)
  with pytest.raises(ValueError, match="RuleConfig.num_stages must be an int >= 1"):
    expert_rule.RuleConfig(num_stages=0)
  with pytest.raises(ValueError, match="row_walk must be one of"):
    expert_rule.RuleConfig(row_walk="random")
  with pytest.raises(ValueError, match="max_group_elements must be an int in"):
    expert_rule.RuleConfig(max_group_elements=2 ** 31)


@pytest.mark.parametrize("keep", [True, False])
def test_grid_kernels_lower_to_triton(keep):
  """The forward's and the backward's grid passes are one Triton kernel each in the CUDA
  lowering of value and gradients (jax.export, no GPU needed), with and without the kept
  grid A; the XLA grid passes hold none."""
  tokens, d, n_x, n_y = 40, 64, 20, 24
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in
            ((tokens, d), (n_x * n_y, d), (n_x * n_y, d))] + [
      jax.ShapeDtypeStruct((tokens, n), jnp.float32) for n in (n_x, n_y)] + [
      jax.ShapeDtypeStruct((tokens,), jnp.float32), jax.ShapeDtypeStruct((tokens,), jnp.int32)]
  dense = expert_dense.DenseConfig(keep_grid=keep)
  for grid_pass, row_walk, kernels in (("kernel", "sorted", 2), ("kernel", "ranked", 2),
                                      ("xla", "sorted", 0)):
    config = expert_rule.RuleConfig(dense, grid_pass=grid_pass, row_walk=row_walk)
    loss = lambda *a: jnp.sum(expert_rule.atomic_experts_rule(
        *a, config=config, interpret=False).astype(jnp.float32))
    grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    assert triton_kernels(grads, *shapes) == kernels, grid_pass


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("row_walk", expert_rule.ROW_WALKS)
@pytest.mark.parametrize("blocks", [False, True])
def test_grid_kernel_on_gpu(dtype, row_walk, blocks):
  """The compiled grid kernels at the headline's grid (320 x 320, k = 512), 37 tokens (a
  ragged last program), against brute force; `blocks`: in 5 token blocks of 8 (the last
  padded), S kept in groups of 2 blocks (read at offsets, groups joined)."""
  rng = np.random.default_rng(7)
  args, rule, pairs, dy = rule_inputs(rng, 37, 128, 320, 320, 512, dtype)
  grid = 320 * 320
  config = expert_rule.RuleConfig(
      expert_dense.DenseConfig(max_block_elements=8 * grid), row_walk=row_walk,
      max_group_elements=2 * 8 * grid) if blocks else expert_rule.RuleConfig(row_walk=row_walk)
  check(args, rule, pairs, dy, config, TOL[dtype], interpret=False)
