"""The dense-regime atomic experts (whole-grid GEMMs, routing as a mask) against brute
force, and the density rule that picks them. No Pallas kernel here: XLA runs it on CPU
as on GPU. Errors are ||got - want|| / ||want||: float32 < 1e-5, bfloat16 < 1e-2.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import ops, reference
from omnimoe.pallas import expert_dense, expert_ops
from tests import brute_force as bf
from tests.test_pallas_experts import TOL, check_against_brute_force, expert_inputs

DENSE = expert_ops.ExpertConfig(path="dense")


def blocks_of(rows, n_experts):
  """The dense path with token blocks of `rows` rows (a scan over several blocks)."""
  return expert_ops.ExpertConfig(path="dense", dense=expert_dense.DenseConfig(
      max_block_elements=rows * n_experts))


@pytest.mark.parametrize("tokens,d,n_experts,k,rows,dtype", [
    (37, 96, 100, 25, 0, jnp.float32),     # k = N / 4, one block
    (37, 96, 100, 25, 8, jnp.float32),     # blocks of 8 rows, the last one padded
    (37, 96, 9, 1, 16, jnp.float32),       # k = 1, N = 9
    (21, 64, 300, 40, 8, jnp.bfloat16),
    (21, 64, 300, 40, 0, jnp.bfloat16),    # one block: dU, dV written in bf16 by the GEMMs
])
def test_values_and_gradients(tokens, d, n_experts, k, rows, dtype):
  rng = np.random.default_rng(tokens + d + k + rows)
  args, idx, dy = expert_inputs(rng, tokens, d, n_experts, k, dtype)
  # A token taking one expert several times, shared with another token: k times in float32;
  # twice in bf16, where the repeats add up in the grid's dtype (k = 40 bf16 roundings in
  # one sum reached ~1.1e-2 over seeds, past the bf16 bound).
  idx[0, :k if dtype == jnp.float32 else 2] = idx[1, 0]
  config = blocks_of(rows, n_experts) if rows else DENSE
  check_against_brute_force(args, idx, dy, True, config, TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rebuilt_grid_matches(dtype):
  """keep_grid=False (the backward rebuilds A from the pairs) gives the kept grid's results."""
  rng = np.random.default_rng(5)
  args, idx, dy = expert_inputs(rng, 19, 96, 70, 9, dtype)
  rebuilt = expert_ops.ExpertConfig(path="dense",
                                    dense=expert_dense.DenseConfig(keep_grid=False))
  check_against_brute_force(args, idx, dy, True, rebuilt, TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_expert_in_random_order(dtype):
  """k = N: every token takes every expert once."""
  rng = np.random.default_rng(3)
  args, _, dy = expert_inputs(rng, 19, 96, 64, 1, dtype)
  idx = np.argsort(rng.random((19, 64)), axis=1).astype(np.int32)
  args[3] = jnp.asarray(rng.uniform(0.05, 1.0, idx.shape), dtype)
  check_against_brute_force(args, idx, dy, True, blocks_of(8, 64), TOL[dtype])


def test_duplicates_busy_expert_and_bad_ids():
  """Duplicate pairs add up (and each gets its weight gradient); one expert takes every
  token; ids outside [0, N) contribute nothing, both ways."""
  rng = np.random.default_rng(4)
  args, idx, dy = expert_inputs(rng, 37, 96, 100, 12)
  idx[:, 0] = 57
  idx[2, 4:8] = 81
  idx[::3, 2] = -5
  idx[1::4, 3] = 100
  idx[5, 1] = np.iinfo(np.int32).max
  check_against_brute_force(args, idx, dy, True, blocks_of(16, 100), 1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_other_activations_match_reference_autodiff(activation):
  rng = np.random.default_rng(6)
  args, idx, dy = expert_inputs(rng, 23, 48, 64, 20)
  f = functools.partial(expert_ops.atomic_experts, activation=activation,
                        config=blocks_of(8, 64))
  g = functools.partial(reference.atomic_experts, activation=activation)
  got = jax.vjp(lambda *a: f(*a, jnp.asarray(idx)), *args)
  want = jax.vjp(lambda *a: g(*a, jnp.asarray(idx)), *args)
  assert bf.rel_err(got[0], want[0]) < 1e-5
  for a, b in zip(got[1](dy), want[1](dy)):
    assert bf.rel_err(a, b) < 1e-5


def test_jit_grad_and_empty_batch():
  rng = np.random.default_rng(7)
  args, idx, _ = expert_inputs(rng, 11, 32, 36, 9)
  loss = lambda *a: jnp.sum(jnp.square(expert_ops.atomic_experts(
      *a, jnp.asarray(idx), config=blocks_of(8, 36))))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  want = jax.grad(lambda *a: jnp.sum(jnp.square(reference.atomic_experts(
      *a, jnp.asarray(idx)))), argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(grads, want):
    assert bf.rel_err(a, b) < 1e-5
  empty = [a[:0] if i in (0, 3) else a for i, a in enumerate(args)]
  y = expert_ops.atomic_experts(*empty, jnp.zeros((0, 9), jnp.int32), config=DENSE)
  assert y.shape == (0, 32)


def test_choose_path_and_bad_configs():
  choose = expert_ops.choose_path
  assert choose(4096, 4096, 320 * 320) == "dense"     # the paper's headline
  assert choose(4096, 1024, 320 * 320) == "dense"
  assert choose(4096, 32, 65536) == "tokens"          # the released code's examples
  assert choose(4096, 128, 2 ** 20) == "tokens"
  assert choose(4096, 16, 4096) == "tokens"            # the measured crossovers
  assert choose(4096, 32, 4096) == "tokens"
  assert choose(4096, 64, 4096) == "dense"
  assert choose(4096, 128, 320 * 320) == "tokens"
  assert choose(4096, 160, 320 * 320) == "dense"
  assert choose(4096, 512, 2 ** 20) == "tokens"
  assert choose(4096, 2048, 2 ** 20) == "dense"
  assert choose(1, 4096, 320 * 320) == "tokens"       # decoding: few pairs, gathers win
  assert choose(64, 512, 320 * 320) == "tokens"       # T k = 0.32 N
  assert choose(16, 4096, 320 * 320) == "dense"       # T k = 0.64 N: the tables, once
  rng = np.random.default_rng(8)
  args, idx, _ = expert_inputs(rng, 5, 32, 16, 4)
  with pytest.raises(ValueError, match="ExpertConfig.path must be 'auto' or one of"):
    expert_ops.ExpertConfig(path="rows")  # refused where it is built
  with pytest.raises(ValueError, match="max_block_elements"):
    expert_ops.atomic_experts(*args, jnp.asarray(idx), config=blocks_of(0, 16))


@pytest.mark.parametrize("tokens,n_experts,most,want", [
    (4096, 320 * 320, 2 ** 29, 4096),      # fits: one block
    (16384, 320 * 320, 2 ** 29, 4096),     # 4 blocks of 4096, not 3 x 5240 + 664 padded
    (6000, 320 * 320, 2 ** 29, 3000),      # 2 blocks of 3000, not 5240 + 760 padded
    (37, 100, 8 * 100, 8),                 # 5 blocks of 8 (40 rows)
    (33, 100, 12 * 100, 8),                # 12 rows allowed, rounded down to 8: 5 blocks of 8
    (100, 1000, 1, 8),                     # at least 8 rows whatever the bound
    (16384, 320 * 320, None, 16384),       # the default: one block up to 2^31 - 1
    (32768, 320 * 320, None, 16384),       # past it, 2 balanced blocks
])
def test_token_blocks_are_balanced(tokens, n_experts, most, want):
  config = (expert_dense.DenseConfig() if most is None
            else expert_dense.DenseConfig(max_block_elements=most))
  most = config.max_block_elements
  rows = expert_dense.block_rows(tokens, n_experts, config)
  assert rows == want
  if rows < tokens:
    allowed = max(8, most // n_experts // 8 * 8)
    assert rows % 8 == 0 and rows <= allowed
    assert -(-tokens // rows) == -(-tokens // allowed)  # no more blocks than needed


@pytest.mark.parametrize("dtype,rows", [(jnp.float32, 0), (jnp.bfloat16, 0), (jnp.float32, 8)])
def test_unique_pairs_are_stored(dtype, rows):
  """unique_indices=True (grids written by stores): the same results on distinct ids per
  token, invalid ids (negative, past N) still dropped."""
  rng = np.random.default_rng(21 + rows)
  tokens, n_experts, k = 23, 90, 30
  args, _, dy = expert_inputs(rng, tokens, 64, n_experts, k, dtype)
  idx = np.stack([rng.permutation(n_experts)[:k] for _ in range(tokens)]).astype(np.int32)
  idx[2, 3], idx[2, 5], idx[7, 0] = -1, n_experts + 7, n_experts
  config = blocks_of(rows, n_experts) if rows else DENSE
  check_against_brute_force(args, idx, dy, True, config, TOL[dtype], unique=True)


def test_unique_indices_promise_is_checked():
  rng = np.random.default_rng(3)
  args, idx, _ = expert_inputs(rng, 6, 32, 64, 8)
  idx[4, 6] = idx[4, 1]
  with pytest.raises(ValueError, match="unique_indices=True, but token 4 lists an expert"):
    ops.atomic_experts(*args, jnp.asarray(idx), impl="pallas", unique_indices=True)


def test_public_op_reaches_the_dense_path():
  """ops.atomic_experts(impl="pallas") with k a sizeable fraction of N runs the dense
  path (same numbers as the reference)."""
  rng = np.random.default_rng(9)
  args, idx, _ = expert_inputs(rng, 40, 32, 64, 16)
  assert expert_ops.choose_path(40, 16, 64) == "dense"
  got = ops.atomic_experts(*args, jnp.asarray(idx), impl="pallas")
  assert bf.rel_err(got, reference.atomic_experts(*args, jnp.asarray(idx))) < 1e-5
