"""Float64 NumPy brute force (full N-way top-k, explicit per-pair loops) and the random
inputs the tests feed it.

Shared by the reference tests and the kernel tests, so every implementation is held to
the same obviously-correct oracle on the same kind of data.
"""
import numpy as np

SILU_SCALE = 3  # x is scaled so that <x, up[e]> spans silu's curved region


def log_probs(rng, tokens, n, quantum=None):
  """Random per-axis log-probabilities (float32); with `quantum`, values on a coarse grid
  whose float32 sums are exact, so that scores tie often."""
  if quantum is None:
    logits = rng.standard_normal((tokens, n)) * 2
    logits -= logits.max(axis=-1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))).astype(np.float32)
  return (-quantum * rng.integers(0, 8, size=(tokens, n))).astype(np.float32)


def expert_inputs(rng, tokens, d, n_experts, k):
  """x, up, down, weights, indices (int32), dy: float32 NumPy arrays of random values."""
  x = rng.standard_normal((tokens, d)) / np.sqrt(d) * SILU_SCALE
  up = rng.standard_normal((n_experts, d))
  down = rng.standard_normal((n_experts, d))
  w = rng.uniform(0.05, 1.0, (tokens, k))
  idx = rng.integers(0, n_experts, (tokens, k)).astype(np.int32)
  dy = rng.standard_normal((tokens, d))
  x, up, down, w, dy = (a.astype(np.float32) for a in (x, up, down, w, dy))
  return x, up, down, w, idx, dy

SILU = (lambda s: s / (1.0 + np.exp(-s)),
        lambda s: (1.0 + np.exp(-s) + s * np.exp(-s)) / (1.0 + np.exp(-s)) ** 2)


def full_topk(lx, ly, k):
  """Top-k of all n_x * n_y float32 sums, ordered by (score desc, flat index asc)."""
  lx = np.asarray(lx, np.float32)
  ly = np.asarray(ly, np.float32)
  scores = (lx[:, :, None] + ly[:, None, :]).reshape(lx.shape[0], -1)  # float32 sums
  out_s, out_i = [], []
  for row in scores.astype(np.float64):
    order = np.lexsort((np.arange(row.size), -row))[:k]
    out_s.append(row[order])
    out_i.append(order)
  return np.array(out_s), np.array(out_i)


def rounding_ties(rng, tokens, n_x, n_y, levels=3):
  """lx near -1e8 (float32 spacing 8; `levels` values) and distinct small ly in random
  column order: many different sums round to the same float32, so a row's tied run of the
  sorted ly is not in ascending column order, and a sum from a lower-ranked row or column
  can tie one from a higher-ranked one."""
  lx = -1e8 - 8.0 * rng.integers(0, levels, (tokens, n_x))
  ly = -0.37 * np.stack([rng.permutation(4 * n_y)[:n_y] for _ in range(tokens)])
  return lx.astype(np.float32), ly.astype(np.float32)


def atomic_experts(x, up, down, w, idx):
  """y_t = sum_k silu(<x_t, up[e]>) w_tk down[e], one pair at a time; invalid ids skipped."""
  x, up, down, w = (np.asarray(a, np.float64) for a in (x, up, down, w))
  y = np.zeros_like(x)
  for t in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      if 0 <= e < up.shape[0]:
        y[t] += SILU[0](x[t] @ up[e]) * w[t, j] * down[e]
  return y


def atomic_experts_grads(x, up, down, w, idx, dy):
  """dx, dup, ddown, dw of <dy, y> by the formulas of DESIGN.md section 1, per pair."""
  x, up, down, w, dy = (np.asarray(a, np.float64) for a in (x, up, down, w, dy))
  dx, dup, ddown, dw = (np.zeros_like(a) for a in (x, up, down, w))
  for t in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      if not 0 <= e < up.shape[0]:
        continue
      s = x[t] @ up[e]
      da = dy[t] @ down[e]
      a = SILU[0](s) * w[t, j]
      dw[t, j] = da * SILU[0](s)
      ds = da * w[t, j] * SILU[1](s)
      ddown[e] += a * dy[t]
      dup[e] += ds * x[t]
      dx[t] += ds * up[e]
  return dx, dup, ddown, dw


def rel_err(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def atomic_experts_swiglu(x, up, down, gate, w, idx):
  """y_t = sum_k silu(<x_t, gate[e]>) <x_t, up[e]> w_tk down[e], one pair at a time."""
  x, up, down, gate, w = (np.asarray(a, np.float64) for a in (x, up, down, gate, w))
  y = np.zeros_like(x)
  for t in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      y[t] += SILU[0](x[t] @ gate[e]) * (x[t] @ up[e]) * w[t, j] * down[e]
  return y
