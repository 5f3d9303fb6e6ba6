"""How often the product-key top-k needs its exact tie settling, and that it equals the
full-grid top-k, on ordinary gates.

  PYTHONPATH=. python3 experiments/topk_exactness.py [--n 256] [--k 32] [--chunks 40]

`omnimoe.reference.cartesian_topk` (and the fused Pallas kernel, which returns the same)
ranks only the k x k sums of the k best rows and columns, then checks whether float
rounding could tie a sum from outside those candidates with the k-th sum; such tokens
have their ties settled over the whole grid, O(N) each. This counts them on random
log-softmax gates (logit scales 0.5, 1, 2, 4 in turn), and counts the tokens whose ids
differ from the exact top-k of all n^2 float32 sums under the same tie rule (0 expected).
CPU only; ~1 s per 1,000 tokens at n = 256.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe import reference

SCALES = (0.5, 1.0, 2.0, 4.0)


def full_grid_topk(sums: np.ndarray, k: int) -> np.ndarray:
  """Flat ids of each row's k largest float32 sums, ties to the lower id."""
  theta = -np.partition(-sums, k - 1, axis=1)[:, k - 1:k]
  out = np.empty((len(sums), k), np.int64)
  for t, row in enumerate(sums):
    cand = np.nonzero(row >= theta[t])[0]
    out[t] = cand[np.lexsort((cand, -row[cand].astype(np.float64)))][:k]
  return out


def settled_tokens(lx: np.ndarray, ly: np.ndarray, k: int) -> np.ndarray:
  """(T,) bool: tokens whose outside-candidate bound (the (k+1)-th row with the best
  column, or the best row with the (k+1)-th column, as float32 sums) ties the k-th sum,
  so that the search settles their ties over the whole grid."""
  def bound(a, b):
    if k >= a.shape[1]:
      return np.full(len(a), np.nan, np.float32)  # no next entry: never a tie
    return -np.partition(-a, k, axis=1)[:, k] + b.max(axis=1)
  sums = (lx[:, :, None] + ly[:, None, :]).reshape(len(lx), -1)
  theta = -np.partition(-sums, k - 1, axis=1)[:, k - 1]
  return np.fmax(bound(lx, ly), bound(ly, lx)) == theta


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=256, help="experts per axis (N = n^2)")
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--tokens", type=int, default=1024, help="tokens per chunk")
  parser.add_argument("--chunks", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  differ = settled = 0
  for c in range(args.chunks):
    lx, ly = (np.asarray(jax.nn.log_softmax(
        SCALES[c % len(SCALES)] * rng.standard_normal((args.tokens, args.n)).astype(np.float32)))
        for _ in range(2))
    ids = np.asarray(reference.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), args.k)[1])
    sums = (lx[:, :, None] + ly[:, None, :]).reshape(args.tokens, -1)
    differ += int(np.sum(np.any(full_grid_topk(sums, args.k) != ids, axis=1)))
    settled += int(np.sum(settled_tokens(lx, ly, args.k)))
  print(f"{args.chunks * args.tokens} tokens, n = {args.n}, k = {args.k}, gate scales "
        f"{SCALES}: {settled} had their ties settled over the whole grid; {differ} differ "
        f"from the full-grid top-k")


if __name__ == "__main__":
  main()
