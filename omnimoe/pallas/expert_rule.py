"""Atomic experts in the dense regime, routed by the top-k's membership rule, not pairs.

Reference: `omnimoe.reference.atomic_experts` on the pairs of `reference.cartesian_topk`
with routing weights exp(score) (values), and its autodiff (gradients in x, the tables
and the gates' log-probabilities lx, ly): the same outputs from what the threshold
router knows before it emits any pair, (theta, cut) per token (`router_threshold.threshold`).

Why. In the dense regime (`expert_dense`) the routed branch is the whole (T, N) grid as
GEMMs, and the routing enters only as the grid A of weights. Pairs are a detour there:
the router writes T k of them (16.7 M at the paper's T = k = 4096) and `expert_dense`
scatters them back into a zero-filled grid. Here every grid entry decides its own
membership by the rule that defines the top k,
  e = i n_y + j is routed to t  iff  s > theta_t or (s == theta_t and e <= cut_t),
  s = fl32(lx[t, i] + ly[t, j]),
compared as the routers' order-preserving int32 keys (so exactly the router's set, -0.0
folded into +0.0, whatever the denormal mode), and its weight is exp(s) (routing weights
'exp', the released code's; 'softmax' needs the pairs' path). One elementwise pass over
the grid replaces the emit, the zero fill and the scatter.

Maths, per token block (rows, N), M the rule's mask, W = exp(s):
  forward    S = x U^T;  A = M W act(S);  y = A V
  backward   dA = dy V^T;  G = M W dA;  dS = G act'(S);  dx = dS U;  dU = dS^T x;
             dV = A^T dy;  dlx[t, i] = sum_j G act(S) [t, i n_y + j], dly likewise over i
The grids S, A, dS are written in the inputs' dtype (float32 accumulation inside the
GEMMs, elementwise work in float32). The GEMMs are XLA's (cuBLAS: `expert_dense` says
why). The backward's grid pass (dS, dlx, dly, and A where rebuilt) is one Pallas kernel,
`_grid_grads_kernel`: each token's grid row i is one load of S and dA, dlx[t, i] its sum
and dly a running sum in registers, so S and dA are read once (1.7 GB at the headline,
bf16). As XLA fusions (`RuleConfig(grid_grads="xla")`, kept for the A/B) the row sums and
the column sums are reductions over different axes of the same grid, which XLA does not
fuse into one pass: by bytes ~1.7 GB more, ~0.5 ms at the H100's copy rate (a prediction;
neither is timed on a GPU yet, kernels_notes.md v19). The forward keeps S (T N elements: the backward
needs act'(S) on every routed entry) and, with one token block, A (`DenseConfig.keep_grid`);
token blocks bound the grids' size as in `expert_dense`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

from omnimoe import ops, reference
from omnimoe.pallas import common
from omnimoe.pallas.expert_dense import F32, DenseConfig, block_rows, grid_dot
from omnimoe.pallas.router_topk import _ordered_key


def _routed(score, ids, bound, cut):
  """The rule above: float32 sums `score` at flat expert ids `ids` against a token's theta
  (as its int32 key, `bound`) and cut, broadcast (tokens, 1) against the grid."""
  key = _ordered_key(score)
  return (key > bound) | ((key == bound) & (ids <= cut))


def _rule_grid(lx, ly, theta, cut):
  """(mask, exp(s)) over a block's (rows, N) grid, float32, from the rule above."""
  s = (lx.astype(F32)[:, :, None] + ly.astype(F32)[:, None, :]).reshape(lx.shape[0], -1)
  ids = lax.broadcasted_iota(jnp.int32, s.shape, 1)
  mask = _routed(s, ids, _ordered_key(theta.astype(F32))[:, None], cut[:, None])
  return mask, jnp.exp(s)


def _grid_values(mask, w, s, da, activation: str):
  """The backward's elementwise values at the routed entries, float32: dS = W dA act'(S),
  A = W act(S), and d score = W dA act(S), whose row and column sums are dlx and dly.
  Selected with where, not zeroed by the mask: 0 * inf is NaN."""
  h, dh = common.activation_with_grad(activation, s)
  g = w * da
  return jnp.where(mask, g * dh, 0), jnp.where(mask, w * h, 0), jnp.where(mask, g * h, 0)


GRID_GRADS = ("kernel", "xla")


@dataclasses.dataclass(frozen=True)
class RuleConfig:
  """The dense blocks (`DenseConfig`) and the backward's grid pass: "kernel" (one Pallas
  pass, `_grid_grads_kernel`) or "xla" (the same maths as XLA fusions); the kernel's
  launch (tokens per program, warps, software-pipelining stages of its row loop)."""
  dense: DenseConfig = DenseConfig()
  grid_grads: str = "kernel"
  block_t: int = 4
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if self.grid_grads not in GRID_GRADS:
      raise ValueError(f"RuleConfig.grid_grads must be one of {GRID_GRADS}, got "
                       f"{self.grid_grads!r}")
    common.check_pow2("RuleConfig.block_t", self.block_t)
    common.check_pow2("RuleConfig.num_warps", self.num_warps)
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"RuleConfig.num_stages must be an int >= 1, got {self.num_stages!r}")


def _grid_grads_kernel(s_ref, da_ref, lx_ref, ly_ref, theta_ref, cut_ref, ds_ref,
                       dlx_ref, dly_ref, *a_ref, activation: str, block_t: int):
  """dS, dlx, dly (and A where asked) of `block_t` tokens in one pass over their S, dA.

  The grid row i of a token (its n_y experts i n_y + j) is one masked load of S and dA;
  the rule, exp(s), act and act' are recomputed there, dS (and A) stored, dlx[t, i] the
  row's sum, and dly the running sum over rows, kept in registers and stored once.
  """
  tokens, n_x = lx_ref.shape
  n_y = ly_ref.shape[1]
  t, live, rows = common.token_block(block_t, tokens)
  j, cols, in_row = common.lanes(common.pow2(n_y), n_y)
  inside = live[:, None] & in_row[None, :]
  ly = plt.load(ly_ref.at[rows[:, None], cols[None, :]], mask=inside, other=0.0)
  bound = _ordered_key(plt.load(theta_ref.at[rows]).astype(F32))[:, None]
  cut = plt.load(cut_ref.at[rows])[:, None]

  def row(i, dly):
    ids, loads = i * n_y + j[None, :], i * n_y + cols[None, :]  # stores, loads: `lanes`
    lxi = plt.load(lx_ref.at[rows, jnp.full_like(rows, i)]).astype(F32)
    score = lxi[:, None] + ly.astype(F32)
    routed = inside & _routed(score, ids, bound, cut)
    s = plt.load(s_ref.at[rows[:, None], loads], mask=inside, other=0.0).astype(F32)
    da = plt.load(da_ref.at[rows[:, None], loads], mask=inside, other=0.0).astype(F32)
    ds, a, dscore = _grid_values(routed, jnp.exp(score), s, da, activation)
    plt.store(ds_ref.at[t[:, None], ids], ds.astype(ds_ref.dtype), mask=inside)
    if a_ref:
      plt.store(a_ref[0].at[t[:, None], ids], a.astype(a_ref[0].dtype), mask=inside)
    plt.store(dlx_ref.at[t, jnp.full_like(t, i)], jnp.sum(dscore, axis=1), mask=live)
    return dly + dscore

  dly = lax.fori_loop(0, n_x, row, jnp.zeros(inside.shape, F32))
  plt.store(dly_ref.at[t[:, None], j[None, :]], dly, mask=inside)


def _grid_grads(s, da, lx, ly, theta, cut, activation: str, config: RuleConfig,
                with_a: bool, interpret: bool):
  """(dS, A or None), (dlx, dly) float32 of one token block, by `_grid_grads_kernel`."""
  tokens, n_x = lx.shape
  out_shape = [jax.ShapeDtypeStruct(s.shape, s.dtype),
               jax.ShapeDtypeStruct((tokens, n_x), F32),
               jax.ShapeDtypeStruct(ly.shape, F32)]
  if with_a:
    out_shape.append(jax.ShapeDtypeStruct(s.shape, s.dtype))
  kernel = functools.partial(_grid_grads_kernel, activation=activation,
                             block_t=config.block_t)
  out = common.triton_call(
      kernel, out_shape=out_shape, grid=(common.cdiv(tokens, config.block_t),),
      num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
      name="atomic_experts_rule_grid_grads")(s, da, lx, ly, theta, cut)
  return (out[0], out[3] if with_a else None), (out[1], out[2])


def _forward_block(x, up, down, lx, ly, theta, cut, activation: str):
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  s = grid_dot(x.astype(cdt), up.T.astype(cdt), cdt)
  mask, w = _rule_grid(lx, ly, theta, cut)
  act = reference.ACTIVATIONS[activation]
  a = jnp.where(mask, w * act(s.astype(F32)), 0).astype(cdt)
  return common.dot(a, down.astype(cdt)).astype(x.dtype), s, a


def _blocks(rows: int, *arrays):
  return [reference.token_blocks(a, rows, 0) for a in arrays]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static choices of one call: activation, tokens per block, whether the forward's
  grid A is kept (one block), the backward's grid pass and its launch."""
  activation: str
  rows: int
  keep: bool
  config: RuleConfig
  interpret: bool


def _forward(x, up, down, lx, ly, theta, cut, plan: _Plan):
  """y, the S grid blocks (blocks, rows, N) and, with `plan.keep` (one block), the A grid."""
  if plan.keep:
    y, s, a = _forward_block(x, up, down, lx, ly, theta, cut, plan.activation)
    return y, s[None], a
  y, s = lax.map(lambda b: _forward_block(b[0], up, down, *b[1:], plan.activation)[:2],
                 _blocks(plan.rows, x, lx, ly, theta, cut))
  return reference.unblock_tokens(y, x.shape[0]), s, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _rule_op(x, up, down, lx, ly, theta, cut, plan):
  return _forward(x, up, down, lx, ly, theta, cut, plan)[0]


def _fwd(x, up, down, lx, ly, theta, cut, plan):
  y, s, a = _forward(x, up, down, lx, ly, theta, cut, plan)
  return y, (x, up, down, lx, ly, theta, cut, s, a)


def _xla_grid_grads(s, da, lx, ly, theta, cut, activation: str, with_a: bool):
  """`_grid_grads` as XLA fusions: (dS, A or None), (dlx, dly) float32."""
  ds, a, dscore = _grid_values(*_rule_grid(lx, ly, theta, cut), s.astype(F32),
                               da.astype(F32), activation)
  dscore = dscore.reshape(s.shape[0], lx.shape[1], ly.shape[1])
  return ((ds.astype(s.dtype), a.astype(s.dtype) if with_a else None),
          (dscore.sum(2), dscore.sum(1)))


def _backward_block(b, s, up, down, plan: _Plan, cdt, a=None):
  """One token block: (dS, A) grids, and (dx, dlx, dly); A is rebuilt unless given."""
  xb, lxb, lyb, thetab, cutb, dyb = b
  da = grid_dot(dyb.astype(cdt), down.T.astype(cdt), cdt)
  grid_args = (s, da, lxb, lyb, thetab, cutb, plan.activation)
  if plan.config.grid_grads == "kernel":
    (ds, rebuilt), (dlx, dly) = _grid_grads(*grid_args, plan.config, a is None,
                                            plan.interpret)
  else:
    (ds, rebuilt), (dlx, dly) = _xla_grid_grads(*grid_args, a is None)
  return (ds, rebuilt if a is None else a), (common.dot(ds, up.astype(cdt)), dlx, dly)


def _bwd(plan: _Plan, residuals, dy):
  x, up, down, lx, ly, theta, cut, s, kept_a = residuals
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  if plan.keep:
    (ds, a), per_token = _backward_block((x, lx, ly, theta, cut, dy), s[0], up, down,
                                         plan, cdt, kept_a)
    dup = grid_dot(ds.T, x.astype(cdt), up.dtype)
    ddown = grid_dot(a.T, dy.astype(cdt), down.dtype)
  else:
    def block(grads, b):
      (ds, a), per_token = _backward_block(b[:-1], b[-1], up, down, plan, cdt)
      dup, ddown = grads
      return (dup + common.dot(ds.T, b[0].astype(cdt)),
              ddown + common.dot(a.T, b[5].astype(cdt))), per_token

    zeros = jnp.zeros(up.shape, F32)
    (dup, ddown), per_token = lax.scan(
        block, (zeros, zeros), (*_blocks(plan.rows, x, lx, ly, theta, cut, dy), s))
    per_token = [reference.unblock_tokens(p, x.shape[0]) for p in per_token]
  dx, dlx, dly = per_token
  return (dx.astype(x.dtype), dup.astype(up.dtype), ddown.astype(down.dtype),
          dlx.astype(lx.dtype), dly.astype(ly.dtype), None, None)


_rule_op.defvjp(_fwd, _bwd)


def atomic_experts_rule(x: jax.Array, up: jax.Array, down: jax.Array, lx: jax.Array,
                        ly: jax.Array, theta: jax.Array, cut: jax.Array, *,
                        activation: str = "silu", config: RuleConfig = RuleConfig(),
                        interpret: bool | None = None) -> jax.Array:
  """`y_t = sum over e routed to t of exp(s_te) act(<x_t, up[e]>) down[e]`, (T, d) in
  x.dtype, the routing given by the rule above: lx (T, n_x), ly (T, n_y) the gates'
  log-probabilities (N = n_x n_y), theta (T,) float32 and cut (T,) int32 from
  `router_threshold.threshold(lx, ly, k)`. Equal to `expert_dense.atomic_experts_dense` on
  the pairs of `cartesian_topk(lx, ly, k)` with weights exp(scores). Differentiable in x,
  up, down, lx and ly (theta and cut are a selection: no gradient). `interpret`: the
  backward's grid kernel in Pallas interpret mode (None: unless on a GPU).
  """
  for name, a, rank, meaning in (("x", x, 2, "T, d"), ("up", up, 2, "N, d"),
                                 ("down", down, 2, "N, d"), ("lx", lx, 2, "T, n_x"),
                                 ("ly", ly, 2, "T, n_y"), ("theta", theta, 1, "T"),
                                 ("cut", cut, 1, "T")):
    ops.check_rank(name, a, rank, meaning)
  tokens, n_x = lx.shape
  if ly.shape[0] != tokens or x.shape[0] != tokens or theta.shape != (tokens,) or (
      cut.shape != (tokens,)):
    raise ValueError(f"x, lx, ly, theta, cut must agree on T: {x.shape}, {lx.shape}, "
                     f"{ly.shape}, {theta.shape}, {cut.shape}")
  if up.shape != down.shape or up.shape[0] != n_x * ly.shape[1] or up.shape[1] != x.shape[1]:
    raise ValueError(f"up and down must be (n_x n_y, d) = ({n_x * ly.shape[1]}, "
                     f"{x.shape[1]}), got {up.shape} and {down.shape}")
  if activation not in reference.ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(reference.ACTIVATIONS)}, got "
                     f"{activation!r}")
  if tokens == 0:
    return jnp.zeros(x.shape, x.dtype)
  rows = block_rows(tokens, up.shape[0], config.dense)
  if config.grid_grads == "kernel" and rows * up.shape[0] >= 2 ** 31:
    raise ValueError(f"a token block's grid of {rows} x {up.shape[0]} elements passes the "
                     "grid kernel's int32 offsets: lower DenseConfig.max_block_elements "
                     "below 2^31")
  plan = _Plan(activation, rows, config.dense.keep_grid and rows == tokens, config,
               common.resolve_interpret(interpret))
  return _rule_op(x, up, down, lx, ly, theta, cut.astype(jnp.int32), plan)
