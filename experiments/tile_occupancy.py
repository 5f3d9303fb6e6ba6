"""How many tiles of the (token, expert) grid a GEMM path could skip at large k.

  PYTHONPATH=. python3 experiments/tile_occupancy.py [--n 320] [--tokens 4096] \
      [--k 512 1024 2048 4096] [--logits normal laplace] [--tiles 64x1x64 64x8x8 16x4x4]

In the dense regime (`omnimoe.pallas.expert_dense`) the routed branch runs the whole
(T, N) grid as GEMMs; a kernel could skip a tile (a block of tokens x a block of experts)
with no routed pair. This counts the tiles that hold at least one routed pair, for the
exact top-k of the n x n product grid (float32 sums of two log-softmax gates whose logits
are drawn i.i.d. from each distribution: normal, or laplace for heavier tails; the logits'
scale does not matter, as the set is that of the largest zx_i + zy_j; ties, of measure
zero here, are ignored). A tile "BxRxC" is
B consecutive tokens x an R x C block of the expert grid (R rows, C columns: 1xC is C
consecutive expert ids). Tokens are taken as they come, and again sorted by their best
row and column (a cheap clustering a kernel could do). Also printed: how many of the n
rows hold a token's pairs, on average. CPU only, numpy.
"""
import argparse

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def routed_mask(lx: np.ndarray, ly: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
  """(T, n_x, n_y) bool: each token's k largest sums lx[i] + ly[j]."""
  out = np.empty((len(lx), lx.shape[1], ly.shape[1]), bool)
  for start in range(0, len(lx), chunk):
    sums = (lx[start:start + chunk, :, None] + ly[start:start + chunk, None, :])
    flat = sums.reshape(len(sums), -1)
    theta = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].min(axis=1)
    out[start:start + chunk] = sums >= theta[:, None, None]
  return out


def occupancy(mask: np.ndarray, tokens: int, rows: int, cols: int) -> float:
  """Fraction of (tokens x rows x cols) tiles holding a routed pair."""
  t, n_x, n_y = mask.shape
  if t % tokens or n_x % rows or n_y % cols:
    raise ValueError(f"tile {tokens}x{rows}x{cols} does not divide the grid {mask.shape}")
  tiles = mask.reshape(t // tokens, tokens, n_x // rows, rows, n_y // cols, cols)
  return float(tiles.any(axis=(1, 3, 5)).mean())


def parse_tile(text: str) -> tuple[int, int, int]:
  parts = text.split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"a tile is BxRxC of positive ints, got {text!r}")
  return tuple(int(p) for p in parts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=320, help="experts per axis (N = n^2)")
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--k", type=int, nargs="+", default=[512, 1024, 2048, 4096])
  parser.add_argument("--logits", nargs="+", choices=("normal", "laplace"),
                      default=["normal", "laplace"], help="the gates' logits' distribution")
  parser.add_argument("--tiles", type=parse_tile, nargs="+",
                      default=[(64, 1, 64), (64, 8, 8), (16, 4, 4)])
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if not all(0 < k <= args.n * args.n for k in args.k):
    parser.error(f"every k must be in [1, n^2 = {args.n * args.n}]")

  rng = np.random.default_rng(args.seed)
  names = ["x".join(map(str, tile)) for tile in args.tiles]
  print(f"N = {args.n}^2, T = {args.tokens}: fraction of tiles holding a routed pair")
  print("| k | logits | rows a token uses | token order | " + " | ".join(names) + " |")
  print("| ---: | --- | ---: | --- |" + " ---: |" * len(names))
  for dist in args.logits:
    draw = lambda: log_softmax(getattr(rng, dist)(size=(args.tokens, args.n)))
    lx, ly = draw().astype(np.float32), draw().astype(np.float32)
    by_best = np.lexsort((ly.argmax(axis=1), lx.argmax(axis=1)))
    for k in args.k:
      mask = routed_mask(lx, ly, k)
      rows_used = mask.any(axis=2).sum(axis=1).mean()
      for order, m in (("as they come", mask), ("by best row, column", mask[by_best])):
        cells = " | ".join(f"{occupancy(m, *tile):.3f}" for tile in args.tiles)
        print(f"| {k} | {dist} | {rows_used:.1f} of {args.n} | {order} | {cells} |")


if __name__ == "__main__":
  main()
