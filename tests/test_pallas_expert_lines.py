"""The dense-regime atomic-expert kernels (expert lines x token tiles) against brute force.

Every kernel test runs in Pallas interpret mode on CPU, and compiled on a GPU when one is
present: `python -m pytest --noconftest -m gpu tests/test_pallas_expert_lines.py`.
Errors are ||got - want|| / ||want||: float32 < 1e-5, bfloat16 < 1e-2.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import reference
from omnimoe.pallas import expert_lines, lines
from tests import brute_force as bf
from tests.test_pallas_experts import TOL, expert_inputs
from tests.test_pallas_router import MODES

BLOCK = expert_lines.BlockConfig(block_t=16, block_e=16, block_d=32)


def small(line_size, tiles_per_pass=0):
  """Small tiles, so that T = 37 and d = 96 make several token chunks and d steps."""
  block = dataclasses.replace(BLOCK, tiles_per_pass=tiles_per_pass)
  return expert_lines.LinesConfig(line_size=line_size, forward=block, backward=block,
                                  tables=BLOCK)


def vjp(fn, args, idx, dy, activation="silu"):
  """(y, dx, dup, ddown, dweights) of `fn` at args with cotangent dy."""
  y, pull = jax.vjp(lambda *a: fn(*a, jnp.asarray(idx), activation=activation), *args)
  return (y,) + pull(dy)


def lines_op(config, interpret):
  return functools.partial(expert_lines.atomic_experts_lines, config=config,
                           interpret=interpret)


def check_against_brute_force(args, idx, dy, config, interpret, tol):
  """Value and all four gradients of the silu op against float64 per-pair loops."""
  got = vjp(lines_op(config, interpret), args, idx, dy)
  args64 = [np.asarray(a, np.float64) for a in args]
  want = (bf.atomic_experts(*args64, idx),) + bf.atomic_experts_grads(
      *args64, idx, np.asarray(dy, np.float64))
  for name, a, g, w in zip(("y", "dx", "dup", "ddown", "dw"), [args[0]] + args, got, want):
    assert g.dtype == a.dtype and g.shape == a.shape, name
    assert bf.rel_err(g, w) < tol, name


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("n_experts,k,line_size,passes,dtype", [
    (100, 25, 10, 0, jnp.float32),    # k = N / 4, 10 x 10 grid rows
    (100, 25, 16, 0, jnp.float32),    # N not a multiple of L: the last line is partial
    (100, 25, 40, 2, jnp.float32),    # three expert tiles per line (the last partial),
                                      # scored in passes of two tiles and one
    (100, 1, 10, 0, jnp.float32),     # k = 1
    (100, 25, 16, 0, jnp.bfloat16),
])
def test_values_and_gradients(n_experts, k, line_size, passes, dtype, interpret):
  rng = np.random.default_rng(n_experts + k + line_size)
  args, idx, dy = expert_inputs(rng, 37, 96, n_experts, k, dtype)
  check_against_brute_force(args, idx, dy, small(line_size, passes), interpret, TOL[dtype])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_expert(dtype, interpret):
  """k = N: every token takes every expert once (in a random order)."""
  rng = np.random.default_rng(3)
  args, _, dy = expert_inputs(rng, 37, 96, 100, 1, dtype)
  idx = np.argsort(rng.random((37, 100)), axis=1).astype(np.int32)
  args[3] = jnp.asarray(rng.uniform(0.05, 1.0, idx.shape), dtype)
  check_against_brute_force(args, idx, dy, small(10), interpret, TOL[dtype])


@pytest.mark.parametrize("interpret", MODES)
def test_duplicates_busy_expert_empty_line_and_bad_ids(interpret):
  """Duplicate pairs add up; one expert takes every token; a line (experts 30..39) has
  no token; ids outside [0, N) contribute nothing, both ways."""
  rng = np.random.default_rng(4)
  args, idx, dy = expert_inputs(rng, 37, 96, 100, 12)
  idx = np.where((idx >= 30) & (idx < 40), idx + 20, idx).astype(np.int32)
  idx[:, 0] = 57
  idx[0, :] = idx[1, 3]
  idx[2, 4:8] = 81
  idx[::3, 2] = -5
  idx[1::4, 3] = 100
  idx[5, 1] = np.iinfo(np.int32).max
  check_against_brute_force(args, idx, dy, small(10), interpret, 1e-5)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("activation,dtype", [("relu", jnp.float32), ("silu", jnp.bfloat16),
                                              ("relu", jnp.bfloat16)])
def test_matches_reference_autodiff(activation, dtype, interpret):
  rng = np.random.default_rng(5)
  args, idx, dy = expert_inputs(rng, 37, 96, 100, 25, dtype)
  got = vjp(lines_op(small(16), interpret), args, idx, dy, activation)
  want = vjp(reference.atomic_experts, args, idx, dy, activation)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    assert bf.rel_err(g, w) < TOL[dtype]


@pytest.mark.parametrize("interpret", MODES)
def test_jit_with_default_config(interpret):
  """Default blocks (64 wide) and the automatic line size (a 10 x 10 grid row), jitted."""
  rng = np.random.default_rng(6)
  args, idx, dy = expert_inputs(rng, 37, 96, 100, 25)
  run = lambda fn: jax.jit(lambda *a: vjp(fn, a, idx, dy))(*args)
  got = run(lines_op(expert_lines.LinesConfig(), interpret))
  for g, w in zip(got, run(reference.atomic_experts)):
    assert bf.rel_err(g, w) < 1e-5


@pytest.mark.parametrize("interpret", MODES)
def test_incidences_and_items(interpret):
  """Incidence lists and work items against a NumPy construction."""
  rng = np.random.default_rng(7)
  tokens, n_experts, k, line_size, block_t = 23, 50, 6, 8, 4
  idx = rng.integers(-2, n_experts + 2, (tokens, k)).astype(np.int32)
  idx[:, 0] = 3
  idx[4, :] = 9
  w = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
  inc = lines.incidences(jnp.asarray(idx), jnp.asarray(w), n_experts, line_size,
                         interpret=interpret)
  n_lines = lines.num_lines(n_experts, line_size)
  want_tokens, want_w = [], []
  for line in range(n_lines):
    for t in range(tokens):
      row = np.zeros(line_size)
      for e, g in zip(idx[t], w[t]):
        if 0 <= e < n_experts and e // line_size == line:
          row[e % line_size] += g
      if row.any():
        want_tokens.append(t)
        want_w.append(row)
  n_inc = len(want_tokens)
  assert int(inc.line_start[-1]) == n_inc
  np.testing.assert_array_equal(np.asarray(inc.inc_token[:n_inc]), want_tokens)
  np.testing.assert_allclose(np.asarray(inc.weights[:n_inc]), np.array(want_w), rtol=1e-6)
  work = np.asarray(lines.items(inc.line_start, block_t, inc.inc_token.shape[0], tokens))
  starts = np.asarray(inc.line_start)
  want = [(line, lo, starts[line + 1]) for line in range(n_lines)
          for lo in range(starts[line], starts[line + 1], block_t)]
  np.testing.assert_array_equal(work[:, :len(want)].T, np.array(want).reshape(-1, 3))
  assert not work[1:, len(want):].any()


def test_line_size_and_bad_configs():
  assert expert_lines.auto_line_size(102400) == 320
  rng = np.random.default_rng(8)
  args, idx, _ = expert_inputs(rng, 5, 32, 16, 4)
  bad = expert_lines.LinesConfig(forward=expert_lines.BlockConfig(block_e=24))
  with pytest.raises(ValueError, match="forward.block_e"):
    expert_lines.atomic_experts_lines(*args, jnp.asarray(idx), config=bad)
  with pytest.raises(ValueError, match="activation"):
    expert_lines.atomic_experts_lines(*args, jnp.asarray(idx), activation="swiglu")
