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
GEMMs, elementwise work in float32). The forward keeps S (T N elements: the backward
needs act'(S) on every routed entry) and, with one token block, A (`DenseConfig.keep_grid`);
token blocks bound the grids' size as in `expert_dense`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from omnimoe import ops, reference
from omnimoe.pallas import common
from omnimoe.pallas.expert_dense import F32, DenseConfig, block_rows, grid_dot
from omnimoe.pallas.router_topk import _ordered_key


def _rule_grid(lx, ly, theta, cut):
  """(mask, exp(s)) over a block's (rows, N) grid, float32, from the rule above."""
  s = (lx.astype(F32)[:, :, None] + ly.astype(F32)[:, None, :]).reshape(lx.shape[0], -1)
  key, bound = _ordered_key(s), _ordered_key(theta.astype(F32))[:, None]
  ids = lax.broadcasted_iota(jnp.int32, s.shape, 1)
  mask = (key > bound) | ((key == bound) & (ids <= cut[:, None]))
  return mask, jnp.exp(s)


def _forward_block(x, up, down, lx, ly, theta, cut, activation: str):
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  s = grid_dot(x.astype(cdt), up.T.astype(cdt), cdt)
  mask, w = _rule_grid(lx, ly, theta, cut)
  act = reference.ACTIVATIONS[activation]
  a = jnp.where(mask, w * act(s.astype(F32)), 0).astype(cdt)
  return common.dot(a, down.astype(cdt)).astype(x.dtype), s, a


def _blocks(rows: int, *arrays):
  return [reference.token_blocks(a, rows, 0) for a in arrays]


def _forward(x, up, down, lx, ly, theta, cut, activation, rows: int, keep: bool):
  """y, the S grid blocks (blocks, rows, N) and, with `keep` (one block), the A grid."""
  if keep:
    y, s, a = _forward_block(x, up, down, lx, ly, theta, cut, activation)
    return y, s[None], a
  y, s = lax.map(lambda b: _forward_block(b[0], up, down, *b[1:], activation)[:2],
                 _blocks(rows, x, lx, ly, theta, cut))
  return reference.unblock_tokens(y, x.shape[0]), s, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _rule_op(x, up, down, lx, ly, theta, cut, activation, rows, keep):
  return _forward(x, up, down, lx, ly, theta, cut, activation, rows, keep)[0]


def _fwd(x, up, down, lx, ly, theta, cut, activation, rows, keep):
  y, s, a = _forward(x, up, down, lx, ly, theta, cut, activation, rows, keep)
  return y, (x, up, down, lx, ly, theta, cut, s, a)


def _backward_block(b, s, up, down, activation: str, cdt, a=None):
  """One token block: (dS, A) grids, and (dx, dlx, dly)."""
  xb, lxb, lyb, thetab, cutb, dyb = b
  mask, w = _rule_grid(lxb, lyb, thetab, cutb)
  h, dh = common.activation_with_grad(activation, s.astype(F32))
  da = grid_dot(dyb.astype(cdt), down.T.astype(cdt), cdt)
  g = w * da.astype(F32)  # masked below with where, not by zeros: 0 * inf is NaN
  ds = jnp.where(mask, g * dh, 0).astype(cdt)
  if a is None:
    a = jnp.where(mask, w * h, 0).astype(cdt)
  dscore = jnp.where(mask, g * h, 0).reshape(s.shape[0], lxb.shape[1], lyb.shape[1])
  return (ds, a), (common.dot(ds, up.astype(cdt)), dscore.sum(2), dscore.sum(1))


def _bwd(activation, rows, keep, residuals, dy):
  x, up, down, lx, ly, theta, cut, s, kept_a = residuals
  cdt = common.mma_dtype(x.dtype, up.dtype, down.dtype)
  if keep:
    (ds, a), per_token = _backward_block((x, lx, ly, theta, cut, dy), s[0], up, down,
                                         activation, cdt, kept_a)
    dup = grid_dot(ds.T, x.astype(cdt), up.dtype)
    ddown = grid_dot(a.T, dy.astype(cdt), down.dtype)
  else:
    def block(grads, b):
      (ds, a), per_token = _backward_block(b[:-1], b[-1], up, down, activation, cdt)
      dup, ddown = grads
      return (dup + common.dot(ds.T, b[0].astype(cdt)),
              ddown + common.dot(a.T, b[5].astype(cdt))), per_token

    zeros = jnp.zeros(up.shape, F32)
    (dup, ddown), per_token = lax.scan(
        block, (zeros, zeros), (*_blocks(rows, x, lx, ly, theta, cut, dy), s))
    per_token = [reference.unblock_tokens(p, x.shape[0]) for p in per_token]
  dx, dlx, dly = per_token
  return (dx.astype(x.dtype), dup.astype(up.dtype), ddown.astype(down.dtype),
          dlx.astype(lx.dtype), dly.astype(ly.dtype), None, None)


_rule_op.defvjp(_fwd, _bwd)


def atomic_experts_rule(x: jax.Array, up: jax.Array, down: jax.Array, lx: jax.Array,
                        ly: jax.Array, theta: jax.Array, cut: jax.Array, *,
                        activation: str = "silu",
                        config: DenseConfig = DenseConfig()) -> jax.Array:
  """`y_t = sum over e routed to t of exp(s_te) act(<x_t, up[e]>) down[e]`, (T, d) in
  x.dtype, the routing given by the rule above: lx (T, n_x), ly (T, n_y) the gates'
  log-probabilities (N = n_x n_y), theta (T,) float32 and cut (T,) int32 from
  `router_threshold.threshold(lx, ly, k)`. Equal to `expert_dense.atomic_experts_dense` on
  the pairs of `cartesian_topk(lx, ly, k)` with weights exp(scores). Differentiable in x,
  up, down, lx and ly (theta and cut are a selection: no gradient).
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
  rows = block_rows(tokens, up.shape[0], config)
  return _rule_op(x, up, down, lx, ly, theta, cut.astype(jnp.int32), activation, rows,
                  config.keep_grid and rows == tokens)
