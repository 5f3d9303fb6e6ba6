"""The atomic-expert kernels (forward, custom VJP, bucketing) against brute force.

Every kernel test runs in Pallas interpret mode on CPU, and compiled on a GPU when one
is present (`-m gpu`; see tests/test_pallas_router.py for the command on a GPU host).
Errors are ||got - want|| / ||want||: float32 < 1e-5, bfloat16 < 1e-2.
"""
import contextlib
import dataclasses
import functools
import inspect
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import ops, reference
from omnimoe.pallas import bucketing, common, expert_ops, expert_tables, expert_tokens
from tests import bounds
from tests import brute_force as bf
from tests.test_pallas_router import MODES
from tests.triton_lowering import triton_kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# path="tokens": at these sizes "auto" would pick the dense path (tested on its own).
SMALL = expert_ops.ExpertConfig(
    path="tokens", forward_impl="kernel", forward=expert_ops.TokenConfig(block_t=4, block_d=64),
    backward=expert_ops.TokenConfig(block_t=8, block_d=32),
    tables=expert_ops.TableConfig(block_p=16, block_d=64))
# The same with s and da in bucket order (several buckets a program, d in two tiles).
BUCKETS = dataclasses.replace(SMALL, pair_scores="buckets",
                              scores=expert_ops.ScoreConfig(block_p=16, block_d=64))
SCHEDULES = pytest.mark.parametrize("config", [SMALL, BUCKETS], ids=["tokens", "buckets"])


def expert_inputs(rng, tokens, d, n_experts, k, dtype=jnp.float32):
  """([x, up, down, weights] in `dtype`, indices, dy) from `bf.expert_inputs`."""
  x, up, down, w, idx, dy = bf.expert_inputs(rng, tokens, d, n_experts, k)
  return [jnp.asarray(a, dtype) for a in (x, up, down, w)], idx, jnp.asarray(dy, dtype)


def check_against_brute_force(args, idx, dy, interpret, config, tol, unique=False):
  """Value and all four gradients of the silu op against float64 per-pair loops."""
  f = functools.partial(expert_ops.atomic_experts, config=config, interpret=interpret,
                        unique_indices=unique)
  y, vjp = jax.vjp(lambda *a: f(*a, jnp.asarray(idx)), *args)
  grads = vjp(dy)
  args64 = [np.asarray(a, np.float64) for a in args]
  want_y = bf.atomic_experts(*args64, idx)
  # the forward alone and the custom VJP's forward rule (they may run different forwards)
  for got in (f(*args, jnp.asarray(idx)), y):
    assert got.dtype == args[0].dtype and got.shape == args[0].shape
    assert bf.rel_err(got, want_y) < tol
  want = bf.atomic_experts_grads(*args64, idx, np.asarray(dy, np.float64))
  for name, a, g, w in zip(("dx", "dup", "ddown", "dw"), args, grads, want):
    assert g.dtype == a.dtype and g.shape == a.shape, name
    assert bf.rel_err(g, w) < tol, name


@SCHEDULES
@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("tokens,d,n_experts,k,dtype", [
    (37, 96, 50, 5, jnp.float32),    # T, d not multiples of the blocks
    (37, 96, 9, 1, jnp.float32),     # k = 1
    (37, 96, 50, 5, jnp.bfloat16),
    (37, 96, 9, 1, jnp.bfloat16),
    (21, 64, 300, 12, jnp.bfloat16),
])
def test_values_and_gradients(tokens, d, n_experts, k, dtype, interpret, config):
  rng = np.random.default_rng(tokens + d + k)
  args, idx, dy = expert_inputs(rng, tokens, d, n_experts, k, dtype)
  idx[0, :] = idx[1, 0]  # a token taking one expert k times, shared with another token
  check_against_brute_force(args, idx, dy, interpret, config, TOL[dtype])


def bad_id_inputs():
  """29 tokens (a partial last block), d = 40 (a partial tile), N = 70; one expert takes
  every token, and ids -5, N and INT32_MAX."""
  rng = np.random.default_rng(11)
  args, idx, dy = expert_inputs(rng, 29, 40, 70, 4)
  idx[:, 1] = 7
  idx[::2, 2] = -5
  idx[1::3, 3] = 70
  idx[5, 0] = np.iinfo(np.int32).max
  return args, idx, dy


@SCHEDULES
@pytest.mark.parametrize("interpret", MODES)
def test_one_expert_takes_every_token_and_bad_ids_are_masked(interpret, config):
  """Many chunks in one bucket; ids outside [0, N) contribute nothing, both ways. In
  interpret mode under tests/bounds.py: a gather there clamps whatever address it gets,
  so right values alone do not show that the kernels (forward, backward, bucketing,
  tables) clamp their own; the guard checks every address they take."""
  args, idx, dy = bad_id_inputs()
  with bounds.checked() if interpret else contextlib.nullcontext():
    check_against_brute_force(args, idx, dy, interpret, config, 1e-5)


UNCLAMPED = {  # a clamp or mask taken out: (module, its text, the text without, where
    # the guard sees it: the access and the function)
    "expert-ids": (expert_tokens, "return jnp.where(valid, e, 0), exists, valid",
                   "return e, exists, valid", "load", "_gather_tile"),
    "columns": (common, "raw if size % width == 0 else jnp.minimum(raw, size - 1)", "raw",
                "load", "_gather_tile"),
    "token-rows": (common, "return t, t < tokens, jnp.minimum(t, tokens - 1)",
                   "return t, t < tokens, t", "load", "_pair_experts"),
    "store-columns": (expert_tokens, "mask=live[:, None] & in_d[None, :])",
                      "mask=live[:, None])", "store", "tile"),
}


def module_copy(monkeypatch, module, old: str, new: str):
  """`module` run from its source with `old` replaced by `new`, under another name (the
  file and the imported module stay as they are; the copy is in sys.modules for the
  test only)."""
  source = inspect.getsource(module)
  assert source.count(old) == 1, old
  copy = types.ModuleType(module.__name__ + "_unclamped")
  copy.__file__ = module.__file__
  monkeypatch.setitem(sys.modules, copy.__name__, copy)
  exec(compile(source.replace(old, new), module.__file__, "exec"), copy.__dict__)
  return copy


@pytest.mark.parametrize("unclamped", UNCLAMPED)
def test_bounds_guard_sees_a_missing_clamp(unclamped, monkeypatch):
  """The guard is not vacuous: with one clamp of the token forward taken out (a copy of
  the module; for the token-block and lane helpers, a copy of `common` patched into
  expert_tokens), or the column mask of
  its output store, the bad-id case still gives the right values in interpret mode (the
  gathers clamp, the scatter drops), and the guard reports the accesses."""
  module, old, new, op, site = UNCLAMPED[unclamped]
  copy = module_copy(monkeypatch, module, old, new)
  kernels = copy if module is expert_tokens else expert_tokens
  if module is common:
    monkeypatch.setattr(expert_tokens, "common", copy)
  (x, up, down, w), idx, _ = bad_id_inputs()
  with bounds.recording() as found:
    y, _ = kernels.forward(x, up, down, w, jnp.asarray(idx), activation="silu",
                           config=SMALL.forward, interpret=True)
    assert bf.rel_err(y, bf.atomic_experts(x, up, down, w, idx)) < 1e-5
  assert {v.op for v in found} == {op} and site in {v.site.split()[-1] for v in found}


@pytest.mark.parametrize("width,size,tile,clamped", [
    (256, 1024, 3, False), (32, 32, 0, False), (128, 96, 0, True), (64, 1536 + 32, 24, True),
    (512, 320, 0, True)])
def test_lanes_clamp_only_where_a_lane_can_pass_the_end(width, size, tile, clamped):
  """`common.lanes` emits its clamp (a min, which costs the row gathers their 16-byte
  vector loads on the GPU, kernels_notes.md v13) only where the width does not divide the
  axis; the load lanes are always inside it, and `inside` marks the real ones."""
  fn = lambda t: common.lanes(width, size, t)
  primitives = {e.primitive.name for e in jax.make_jaxpr(fn)(tile).eqns}
  assert ("min" in primitives) == clamped
  raw, for_loads, inside = (np.asarray(v) for v in fn(tile))
  np.testing.assert_array_equal(raw, tile * width + np.arange(width))
  np.testing.assert_array_equal(inside, raw < size)
  np.testing.assert_array_equal(for_loads, np.minimum(raw, size - 1))


# The token kernels at the shapes; forward_impl="kernel" so that every kernel of
# the path runs (the XLA forward is no kernel; the backward is the same either way).
TOKENS_KERNEL_FORWARD = expert_ops.ExpertConfig(path="tokens", forward_impl="kernel")


@pytest.mark.parametrize("interpret", MODES)
def test_token_path_at_d_1536(interpret):
  """d = 1536 at the default launch: 24 forward and 24 backward tiles of 64 columns, 6
  table tiles of 256 (bucket of 16 experts); few tokens, few experts, float32."""
  rng = np.random.default_rng(1536)
  args, idx, dy = expert_inputs(rng, 6, 1536, 40, 4)
  idx[0, :] = idx[1, 0]
  idx[2, 1] = -1
  check_against_brute_force(args, idx, dy, interpret, TOKENS_KERNEL_FORWARD, 1e-5)


@pytest.mark.parametrize("interpret", MODES)
def test_token_path_at_four_million_experts(interpret):
  """N = 2^22 (n = 2048 per axis) at d = 8: table offsets e * d up to 2^25, 16384 buckets
  of 256 experts (auto at d = 8), ids at both ends of the table and outside it. The brute
  force runs on the used rows (ids renumbered); every other row's gradient must be 0."""
  n_experts, tokens, d, k = 2 ** 22, 16, 8, 4
  rng = np.random.default_rng(22)
  x, _, _, w, _, dy = bf.expert_inputs(rng, tokens, d, 1, k)
  up, down = (rng.random((n_experts, d), np.float32) - 0.5 for _ in range(2))
  idx = rng.integers(0, n_experts, (tokens, k)).astype(np.int32)
  idx[:, 0] = rng.integers(n_experts - 40, n_experts, tokens)  # the last bucket
  idx[0, :] = n_experts - 1
  idx[1, 1], idx[2, 2], idx[5, 1] = n_experts, -5, 0
  idx[3, 3], idx[4, 0] = np.iinfo(np.int32).max, np.iinfo(np.int32).min
  f = functools.partial(expert_ops.atomic_experts, config=TOKENS_KERNEL_FORWARD,
                        interpret=interpret)
  y, vjp = jax.vjp(lambda *a: f(*a, jnp.asarray(idx)), *map(jnp.asarray, (x, up, down, w)))
  dx, dup, ddown, dw = (np.asarray(g) for g in vjp(jnp.asarray(dy)))
  valid = (idx >= 0) & (idx < n_experts)
  used = np.unique(idx[valid])
  compact = np.where(valid, np.searchsorted(used, idx), -1).astype(np.int32)
  assert bf.rel_err(y, bf.atomic_experts(x, up[used], down[used], w, compact)) < 1e-5
  want = bf.atomic_experts_grads(x, up[used], down[used], w, compact, dy)
  for name, g, wnt in zip(("dx", "dup", "ddown", "dw"), (dx, dup, ddown, dw), want):
    if g.shape[0] == n_experts:
      assert bf.rel_err(g[used], wnt) < 1e-5, name
      assert np.all(np.isin(np.flatnonzero(np.any(g, axis=1)), used)), name  # others 0
    else:
      assert bf.rel_err(g, wnt) < 1e-5, name


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("config", [
    expert_ops.ExpertConfig(path="tokens", forward_impl="kernel"),
    expert_ops.ExpertConfig(path="tokens", forward_impl="xla", xla_forward_chunk=2),
    expert_ops.ExpertConfig(path="tokens", forward_impl="xla"),
    expert_ops.ExpertConfig(path="tokens", xla_forward_chunk=2),
    expert_ops.ExpertConfig(path="tokens", pair_scores="buckets"),
], ids=["kernel-forward-auto-block-t", "xla-forward-chunked", "xla-forward-one-gather",
        "auto-forward", "pair-scores-in-buckets"])
def test_config_variants(config, interpret):
  """The kernel forward with pairs-per-program token blocks (k = 5 -> 16 tokens), the
  XLA forward in chunks of 2, 2, 1 pairs and as one gather (auto: 185 pairs), and "auto"
  (XLA alone, the kernel under vjp), each under the kernels' backward; and the pair
  scores in bucket order at the default launch (185 pairs: three programs of 64)."""
  rng = np.random.default_rng(15)
  args, idx, dy = expert_inputs(rng, 37, 96, 50, 5)
  idx[::4, 2] = -1
  check_against_brute_force(args, idx, dy, interpret, config, 1e-5)


def test_forward_chunk_is_one_gather_for_few_pairs():
  """Auto: one gather fusion up to ONE_GATHER_MAX_PAIRS pairs (decoding), chunks of 8
  above (training shapes); a chunk set in the config is kept."""
  auto, chunk = expert_ops.ExpertConfig(), expert_ops.forward_chunk
  assert chunk(auto, 1, 4096) == 4096 and chunk(auto, 64, 512) == 512
  assert chunk(auto, 4096, 32) == 8 and chunk(auto, 65, 512) == 8
  assert chunk(expert_ops.ExpertConfig(xla_forward_chunk=16), 1, 4096) == 16


BAD_CONFIGS = [
    (expert_ops.ExpertConfig, dict(forward_impl="XLA"),
     r"ExpertConfig.forward_impl must be one of \('auto', 'xla', 'kernel'\), got 'XLA'"),
    (expert_ops.ExpertConfig, dict(xla_forward_chunk=-1),
     r"ExpertConfig.xla_forward_chunk must be 0 \(auto\) or an integer >= 1, got -1"),
    (expert_ops.ExpertConfig, dict(xla_forward_chunk=2.0),
     r"ExpertConfig.xla_forward_chunk must be 0 \(auto\) or an integer >= 1, got 2.0"),
    (expert_ops.ExpertConfig, dict(pair_scores="experts"),
     r"ExpertConfig.pair_scores must be one of \('tokens', 'buckets'\), got 'experts'"),
    (expert_ops.ScoreConfig, dict(block_p=48),
     "ScoreConfig.block_p must be a power of two, got 48"),
    (expert_ops.ExpertConfig, dict(path="rows"),
     r"ExpertConfig.path must be 'auto' or one of \('tokens', 'dense', 'lines'\), got 'rows'"),
    (expert_ops.TokenConfig, dict(block_t=3),
     r"TokenConfig.block_t must be 0 \(auto\) or a power of two, got 3"),
    (expert_ops.TokenConfig, dict(block_t=-4), "TokenConfig.block_t must be 0"),
    (expert_ops.TokenConfig, dict(block_d=48),
     "TokenConfig.block_d must be a power of two, got 48"),
    (expert_ops.TokenConfig, dict(num_warps=0),
     "TokenConfig.num_warps must be a power of two, got 0"),
    (expert_ops.TableConfig, dict(bucket_size=8),
     r"TableConfig.bucket_size must be 0 \(auto\) or a power of two >= 16 \(a tensor-core "
     r"operand dimension\), got 8"),
    (expert_ops.TableConfig, dict(block_p=24), "TableConfig.block_p must be 0 .* >= 16"),
    (expert_ops.TableConfig, dict(block_d=8),
     "TableConfig.block_d must be a power of two >= 16"),
    (expert_ops.TableConfig, dict(num_warps=6),
     "TableConfig.num_warps must be a power of two, got 6"),
    (expert_ops.TableConfig, dict(bucketing="radix"),
     r"TableConfig.bucketing must be one of \('atomic', 'sort'\), got 'radix'"),
]


@pytest.mark.parametrize("cls,fields,match", BAD_CONFIGS, ids=[
    cls.__name__ + "".join(f"-{k}={v}" for k, v in fields.items())
    for cls, fields, _ in BAD_CONFIGS])
def test_bad_config_is_refused(cls, fields, match):
  """At construction, naming the field and its rule (a forward_impl other than "xla" used
  to run the kernel forward; block sizes the kernels cannot tile failed deep in Triton)."""
  with pytest.raises(ValueError, match=match):
    cls(**fields)


def test_bucket_size_follows_the_tile_that_runs(monkeypatch):
  """16 experts per bucket at the default launch (4 warps x 256 columns: the register cap)
  whatever the density; where the tile is narrower, ~16 pairs per bucket up to the cap.
  The cap counts the column tile the kernel runs, min(block_d, pow2(d)): at d = 64 a
  64-expert bucket holds as many accumulators as a 16 x 256 one."""
  default, narrow = expert_ops.TableConfig(), expert_ops.TableConfig(block_d=128)
  for n, k in [(4096, 16), (65536, 32), (102400, 128), (2 ** 20, 32), (2 ** 22, 16)]:
    assert expert_tables.auto_bucket_size(default, 4096 * k, n) == 16
  assert expert_tables.auto_bucket_size(narrow, 4096 * 32, 65536) == 16  # 16 pairs
  assert expert_tables.auto_bucket_size(narrow, 4096 * 32, 2 ** 20) == 32  # the cap
  sizes, real = [], bucketing.bucket_pairs

  def bucket_pairs(indices, num_experts, bucket_size, **kwargs):
    sizes.append(bucket_size)
    return real(indices, num_experts, bucket_size, **kwargs)

  monkeypatch.setattr(bucketing, "bucket_pairs", bucket_pairs)
  args, idx, dy = expert_inputs(np.random.default_rng(16), 8, 64, 1000, 2)
  check_against_brute_force(args, idx, dy, True, expert_ops.ExpertConfig(path="tokens"), 1e-5)
  assert sizes == [64]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_activations_match_reference_autodiff(activation, interpret):
  rng = np.random.default_rng(12)
  args, idx, dy = expert_inputs(rng, 13, 48, 20, 3)
  idx = jnp.asarray(idx)

  def vjp(fn):
    y, pull = jax.vjp(lambda *a: fn(*a, idx, activation=activation), *args)
    return (y,) + pull(dy)

  want = vjp(reference.atomic_experts)
  for config in (SMALL, BUCKETS):
    got = vjp(functools.partial(expert_ops.atomic_experts, config=config, interpret=interpret))
    for g, w in zip(got, want):
      assert bf.rel_err(g, w) < 1e-5


@SCHEDULES
@pytest.mark.parametrize("interpret", MODES)
def test_float32_tables_under_bf16_tokens(interpret, config):
  """The expert bank's mix with float32 master weights (`experts.cast_tables`: tables as
  stored): bf16 x, dy and weights, float32 U and V; each gradient in its input's dtype."""
  rng = np.random.default_rng(17)
  (x, up, down, w), idx, dy = expert_inputs(rng, 29, 96, 200, 6)
  args = [x.astype(jnp.bfloat16), up, down, w.astype(jnp.bfloat16)]
  check_against_brute_force(args, idx, dy.astype(jnp.bfloat16), interpret, config,
                            TOL[jnp.bfloat16])


def test_jit_grad_through_ops_with_default_config():
  rng = np.random.default_rng(13)
  args, idx, dy = expert_inputs(rng, 19, 160, 1000, 6)
  idx = jnp.asarray(idx)

  def grads(impl):
    loss = lambda *a: jnp.vdot(ops.atomic_experts(*a, idx, impl=impl), dy)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)

  (got_v, got_g), (want_v, want_g) = grads("pallas"), grads("xla")
  assert bf.rel_err(got_v, want_v) < 1e-5
  for g, w in zip(got_g, want_g):
    assert bf.rel_err(g, w) < 1e-5


PATHS = pytest.mark.parametrize("config", [
    SMALL, BUCKETS, expert_ops.ExpertConfig(path="dense"), expert_ops.ExpertConfig(path="lines")],
    ids=["tokens", "buckets", "dense", "lines"])


@PATHS
def test_second_order_matches_reference_autodiff(config):
  """grad of the loss plus a function of its gradients (a gradient penalty: a Hessian-vector
  product in all four inputs plus the gradient): first order by the kernels, second by
  the reference's autodiff."""
  rng = np.random.default_rng(18)
  args, idx, dy = expert_inputs(rng, 11, 40, 36, 9)
  idx[0, :3] = 5  # an expert taken three times by one token
  idx = jnp.asarray(idx)
  probes = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args]

  def hvp(fn):
    loss = lambda *a: jnp.vdot(fn(*a, idx), dy)
    value_and_grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    def penalised(*a):  # the value from inside the differentiated gradient's own forward
      value, grads = value_and_grads(*a)
      return value + sum(jnp.vdot(g, v) for g, v in zip(grads, probes))

    return value_and_grads(*args), jax.grad(penalised, argnums=(0, 1, 2, 3))(*args)

  got = hvp(functools.partial(expert_ops.atomic_experts, config=config, interpret=True))
  want = hvp(reference.atomic_experts)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert bf.rel_err(g, w) < 1e-5


@PATHS
def test_an_unrouted_experts_overflowed_score_stays_out(config):
  """A finite input whose score at an expert nobody routes to overflows to inf: the
  reference never sees that expert, so neither may 0 * inf = NaN (dense and line tiles
  score every expert of a tile)."""
  rng = np.random.default_rng(19)
  args, idx, dy = expert_inputs(rng, 6, 40, 9, 1)
  x, up, down, w = args
  x, up = x.at[:].set(1e19), up.at[:].set(1e-21).at[1].set(1e19)  # <x, up[1]> = inf
  idx = jnp.asarray(np.where(idx == 1, 0, idx))
  for activation in ("silu", "relu"):
    y, vjp = jax.vjp(lambda *a: expert_ops.atomic_experts(
        *a, idx, activation=activation, config=config, interpret=True), x, up, down, w)
    for got in (y, *vjp(dy)):
      assert jnp.all(jnp.isfinite(got)), activation


@pytest.mark.parametrize("interpret", MODES)
def test_bucketing_methods_agree(interpret):
  """Same buckets, same members, whatever the placement order inside a bucket."""
  rng = np.random.default_rng(14)
  idx = rng.integers(-3, 600, (45, 7)).astype(np.int32)
  idx[:10, :] = 17
  results = [bucketing.bucket_pairs(jnp.asarray(idx), 600, 16, method=m, interpret=interpret)
             for m in bucketing.METHODS]
  (order_a, starts_a), (order_s, starts_s) = [(np.asarray(o), np.asarray(s))
                                              for o, s in results]
  np.testing.assert_array_equal(starts_a, starts_s)
  flat = idx.reshape(-1)
  assert starts_a[-1] == np.sum((flat >= 0) & (flat < 600))
  for b in range(len(starts_a) - 1):
    members = order_a[starts_a[b]:starts_a[b + 1]]
    np.testing.assert_array_equal(np.sort(members), order_s[starts_s[b]:starts_s[b + 1]])
    assert np.all(flat[members] // 16 == b)


@pytest.mark.parametrize("interpret", MODES)
def test_lines_path_through_the_op(interpret):
  """config.path='lines' runs the expert-line kernels behind the same entry point (k = N/4
  of a 10 x 10 grid, every token in every line)."""
  rng = np.random.default_rng(5)
  args, idx, dy = expert_inputs(rng, 19, 96, 100, 25)
  lines = expert_ops.ExpertConfig(path="lines")
  check_against_brute_force(args, idx, dy, interpret, lines, TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("path,forward_impl,pair_scores,fwd_kernels,grad_kernels", [
    ("tokens", "xla", "tokens", 0, 3), ("tokens", "kernel", "tokens", 1, 4),
    ("tokens", "auto", "tokens", 0, 4), ("tokens", "auto", "buckets", 0, 5),
    ("lines", "xla", "tokens", 2, 4)])
def test_kernels_lower_to_triton(path, forward_impl, pair_scores, fwd_kernels, grad_kernels,
                                 dtype):
  """Every Pallas path of the op, forward and gradients, lowers to Triton IR for CUDA
  (d = 96 and T = 37: no power of two); grad runs the forward too, hence its count
  ("auto": the XLA forward alone, the kernel one under grad; with pair scores in
  buckets: bucketing and scores forward, whose combine is dead code under the grad of a
  sum, then scores, combine and tables backward)."""
  config = expert_ops.ExpertConfig(path=path, forward_impl=forward_impl,
                                   pair_scores=pair_scores)
  f = lambda *a: expert_ops.atomic_experts(*a, config=config, interpret=False)
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  tokens, d, n_experts, k = 37, 96, 300, 5
  shapes = [jax.ShapeDtypeStruct(s, dt) for s, dt in [
      ((tokens, d), dtype), ((n_experts, d), dtype), ((n_experts, d), dtype),
      ((tokens, k), dtype), ((tokens, k), jnp.int32)]]
  assert triton_kernels(f, *shapes) == fwd_kernels
  assert triton_kernels(grad, *shapes) == grad_kernels
