"""Check and time the Pallas kernels against plain XLA on one GPU, in one run.

  PYTHONPATH=. python3 experiments/bench_kernels.py --parts check,ceilings,stages,table \
      --out $OUT

Parts (any subset, in this order):
  check     kernels vs the reference on the GPU: exact router indices, relative errors
            of values and gradients (f32 < 1e-5, bf16 < 1e-2), bad ids, N = 2^22 rows
  ceilings  copy bandwidth (bytes read + written) and bf16 matmul rate
  table     router / expert op / layer, impl pallas and xla, N in {4096, 65536, 2^20},
            k in {16, 32}; writes kernels-<device>.json (the table) and
            kernels-<device>-detail.json (ceilings, floors, stages, sweeps)
  stages    per-stage times of the layer at N = 65536 and 2^20 (k = 32), 4096 (k = 16)
  variants  expert-op and layer variants side by side (EXPERT_VARIANTS, LAYER_VARIANTS)
  module    the Flax OmniMoELayer as the LM runs it (float32 / bf16 parameters, batch
            statistics, router stats) next to the table's layer function
  scaling   router and layer against N = 2^12 .. 2^22 at k = 32 (pallas, xla); writes
            scaling-<device>.json; `--plot-scaling FILE` draws it (log axes)
  sweep     block-size sweeps (Triton has no autotuner): --sweep router,tokens,tables
`--checks` picks the checks (router, bucketing, experts, huge).
Times are host-timed medians of 7 trials of back-to-back calls (async dispatch, one
block at the end), rotating over 3 input sets; the table, the variants and the table sweep
also give device time (`measure`: the kernels' busy time a call, from a profiler trace of
12 calls, so dispatch gaps do not count); `unrolled` times jit 4 calls on 4 input sets
into one program to remove dispatch gaps from short kernels. Inputs are random,
never zeros. Only omnimoe.ops / reference / pallas are imported (no trainer deps), except
by the module part (flax, ml_collections).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from experiments.benchlib import (BF16, LOG, fwd_bwd, guarded, key_iter, log_probs, rel_err, say,
                                  timeit, timeit_unrolled)
from omnimoe import ops, reference
from omnimoe import router as router_lib
from omnimoe.pallas import (bucketing, common, expert_ops, expert_tables, expert_tokens,
                            router_topk)

T, D, F = 4096, 1024, 4096
CASES = [(4096, 16), (4096, 32), (65536, 16), (65536, 32), (2 ** 20, 16), (2 ** 20, 32)]
STAGE_CASES = [(65536, 32), (2 ** 20, 32), (4096, 16)]
# (block_p, block_d, num_warps, num_stages, bucket_size) of the table sweep
TABLE_SWEEP = [(0, 256, 4, 2, 0), (16, 128, 4, 2, 0), (32, 128, 8, 2, 0), (16, 256, 8, 2, 0),
               (32, 256, 4, 2, 0), (16, 512, 8, 2, 0), (64, 128, 8, 2, 16)]
ROUTER_SWEEP = [(1024, 32), (256, 32), (64, 16)]
ROUTER_CHECKS = [(4096, 1024, 1024, 32), (4096, 64, 64, 16), (1000, 17, 17, 40),
                 (333, 6, 9, 10), (517, 1024, 1024, 128), (64, 2048, 2048, 32)]
TIES_CHECK = (2048, 256, 32)
EXPERT_CHECKS = [(4096, 1024, 65536, 32, BF16, "silu"), (512, 1024, 65536, 32, jnp.float32, "silu"),
                 (1000, 1536, 4096, 16, BF16, "gelu"), (37, 96, 50, 5, jnp.float32, "relu"),
                 (300, 96, 7, 9, jnp.float32, "identity"), (2048, 1024, 2 ** 20, 32, BF16, "silu")]
HUGE_CHECK = (2 ** 22, 1024, 256, 32)  # N, d, tokens, k
DEVICE_CALLS = 12  # traced calls a device time averages
INTERPRET = common.resolve_interpret(None)  # False on a GPU host
def routing(key, n_experts, k, tokens=None):
  """Random router outputs: weights exp(score)-like in (0, 1), ids uniform in [0, N)."""
  tokens = tokens or T
  kw, ki = jax.random.split(key)
  w = jax.random.uniform(kw, (tokens, k), jnp.float32, 0.01, 0.5)
  idx = jax.random.randint(ki, (tokens, k), 0, n_experts, jnp.int32)
  return w, idx


def tables(key, n_experts, d=None, dtype=BF16):
  return benchlib.tables(key, n_experts, d or D, dtype)


def tokens_in(key, tokens=None, d=None, dtype=BF16):
  return benchlib.tokens_in(key, tokens or T, d or D, dtype)


# ----------------------------------------------------------------------------- check

def check_router(keys):
  rows = []
  for tokens, n_x, n_y, k in ROUTER_CHECKS:
    lx, ly = log_probs(next(keys), tokens, n_x), log_probs(next(keys), tokens, n_y)
    got = router_topk.cartesian_topk(lx, ly, k)
    want = jax.jit(reference.cartesian_topk, static_argnums=2)(lx, ly, k)
    bad = int(jnp.sum(jnp.any(got[1] != want[1], axis=1)))
    err = float(jnp.max(jnp.abs(got[0] - want[0])))
    rows.append((f"router T={tokens} n={n_x}x{n_y} k={k}", bad == 0 and err == 0.0,
                 f"tokens differing {bad}, max |score diff| {err}"))
  # ties: a coarse grid of values
  tokens, n, k = TIES_CHECK
  lx, ly = (-0.125 * jax.random.randint(next(keys), (tokens, n), 0, 8).astype(jnp.float32)
            for _ in range(2))
  got = router_topk.cartesian_topk(lx, ly, k)
  want = reference.cartesian_topk(lx, ly, k)
  bad = int(jnp.sum(jnp.any(got[1] != want[1], axis=1)))
  rows.append((f"router ties T={tokens} n={n} k={k}", bad == 0, f"tokens differing {bad}"))
  return rows


def check_experts(keys):
  rows = []
  for tokens, d, n, k, dtype, act in EXPERT_CHECKS:
    x = tokens_in(next(keys), tokens, d, dtype)
    up, down = tables(next(keys), n, d, dtype)
    w, idx = routing(next(keys), n, k, tokens)
    idx = idx.at[::7, 0].set(-1).at[3::11, 1 % k].set(n + 3)  # out-of-range ids
    idx = idx.at[:, k - 1].set(5) if k > 1 else idx           # one expert, every token
    dy = jax.random.normal(next(keys), (tokens, d), dtype)
    w = w.astype(dtype)

    def vjp(fn, dy, *args):
      y, pull = jax.vjp(lambda *a: fn(*a, idx, activation=act), *args)
      return (y,) + pull(dy.astype(y.dtype))

    f32 = [a.astype(jnp.float32) for a in (x, up, down, w)]
    with jax.default_matmul_precision("highest"):
      want = jax.jit(functools.partial(vjp, reference.atomic_experts))(dy, *f32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    # The path "auto" picks, and the token kernels wherever it picks another.
    for path in dict.fromkeys((expert_ops.choose_path(tokens, k, n), "tokens")):
      op = functools.partial(expert_ops.atomic_experts,
                             config=expert_ops.ExpertConfig(path=path))
      got = jax.jit(functools.partial(vjp, op))(dy, x, up, down, w)
      errs = [rel_err(g, wt) for g, wt in zip(got, want)]
      finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in got)
      rows.append((f"experts {path} T={tokens} d={d} N={n} k={k} {jnp.dtype(dtype).name} "
                   f"{act}", finite and max(errs) < tol,
                   "rel err y dx dU dV dw = " + " ".join(f"{e:.1e}" for e in errs)))
  return rows


def check_bucketing(keys):
  """The atomic placement groups exactly the pairs that the stable argsort groups."""
  rows = []
  for n, bucket in [(65536, 16), (2 ** 20, 16)]:
    _, idx = routing(next(keys), n, 32)
    idx = idx.at[::5, 3].set(-2).at[1::9, 4].set(n)
    (oa, sa), (os_, ss) = [jax.tree.map(np.asarray, bucketing.bucket_pairs(
        idx, n, bucket, method=m, interpret=INTERPRET)) for m in ("atomic", "sort")]
    ok = np.array_equal(sa, ss) and all(
        np.array_equal(np.sort(oa[sa[b]:sa[b + 1]]), os_[ss[b]:ss[b + 1]])
        for b in range(len(sa) - 1))
    rows.append((f"bucketing N={n} bucket={bucket}", ok, "atomic == sort per bucket"))
  return rows


def check_huge_table(keys):
  """N = 2^22, d = 1024 (2^32 elements per table): offsets beyond int32 must not wrap."""
  n, d, tokens, k = HUGE_CHECK
  up, down = tables(next(keys), n, d)
  x = tokens_in(next(keys), tokens, d)
  w, idx = routing(next(keys), n, k, tokens)
  idx = idx.at[:, 0].set(n - 1 - jnp.arange(tokens, dtype=jnp.int32))  # the last rows
  dy = jax.random.normal(next(keys), (tokens, d), BF16)
  used = np.unique(np.asarray(idx))
  f32 = lambda a: a.astype(jnp.float32)
  mass = lambda *gs: sum(jnp.sum(jnp.abs(f32(g))) for g in gs)

  def run(x, up, down, w):
    y, pull = jax.vjp(lambda *a: expert_ops.atomic_experts(*a, idx), x, up, down, w)
    dx, dup, ddown, dw = pull(dy)
    return y, dx, dup[used], ddown[used], dw, mass(dup, ddown)

  *got, total = jax.jit(run)(x, up, down, w)
  # the same problem on a compact table of the used rows only
  remap = jnp.asarray(np.searchsorted(used, np.asarray(idx)), jnp.int32)
  with jax.default_matmul_precision("highest"):
    want_y, pull = jax.vjp(lambda *a: reference.atomic_experts(*a, remap),
                           f32(x), f32(up[used]), f32(down[used]), f32(w))
    want = (want_y,) + pull(f32(dy))
  errs = [rel_err(g, wt) for g, wt in zip(got, want)]
  stray = float(abs(total - mass(got[2], got[3])) / mass(got[2], got[3]))
  return [("experts N=2^22 d=1024 bf16 (last rows used)", max(errs) < 1e-2 and stray < 1e-4,
           "rel err y dx dU dV dw = " + " ".join(f"{e:.1e}" for e in errs)
           + f"; relative gradient mass outside the used rows {stray:.1e}")]


CHECKS = dict(router=check_router, bucketing=check_bucketing, experts=check_experts,
              huge=check_huge_table)


def part_check(seed, names):
  keys = key_iter(seed)
  rows = []
  for name, fn in ((name, CHECKS[name]) for name in names):
    rows += guarded(f"check {name}", lambda: fn(keys)) or [(name, False, "raised")]
  say("\n== check")
  for name, ok, detail in rows:
    say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
  return [dict(name=n, ok=bool(o), detail=d) for n, o, d in rows]


# ----------------------------------------------------------------------------- the layer

def init_layer(key, n_experts):
  ks = jax.random.split(key, 6)
  n = int(round(n_experts ** 0.5))
  scale = lambda fan_in: 1.0 / np.sqrt(fan_in)
  return dict(
      w_gate_up=(jax.random.normal(ks[0], (D, 2, F)) * scale(D)).astype(BF16),
      wd=(jax.random.normal(ks[2], (F, D)) * scale(F)).astype(BF16),
      rx=(jax.random.normal(ks[3], (D, n)) * scale(D)).astype(BF16),
      ry=(jax.random.normal(ks[4], (D, n)) * scale(D)).astype(BF16),
      up=(jax.random.normal(ks[5], (n_experts, D)) * 0.05).astype(BF16),
      down=(jax.random.normal(jax.random.fold_in(ks[5], 1), (n_experts, D)) * 0.05
            ).astype(BF16))


def gates(p, x):
  """Row and column log-probabilities (T, n) each, float32; kept as two matmuls (one
  (d, 2n) matmul measured no faster in the layer, run v4-1).

  The GEMM is the model's (`ops.gate_logits`: bf16 operands, float32 logits, a bf16
  backward); bf16-rounded logits would tie at the k-th key in a third of the rows, which
  the model never feeds the top-k (RESULTS.md, "The router on the model's gates")."""
  return tuple(jax.nn.log_softmax(ops.gate_logits(x, r, x.dtype), axis=-1)
               for r in (p["rx"], p["ry"]))


def layer(p, x, *, k, impl, config=None):
  """Shared SwiGLU MLP + Cartesian router (log-softmax gates) + atomic experts; a
  `config` calls the Pallas expert op with it (block-size variants)."""
  weights, idx = router_lib.select_pairs(*gates(p, x), k, "exp", impl)  # the model's
  if config is None:
    y = ops.atomic_experts(x, p["up"], p["down"], weights, idx, impl=impl)
  else:
    y = expert_ops.atomic_experts(x, p["up"], p["down"], weights, idx, config=config)
  return benchlib.shared_mlp(p, x) + y


# ----------------------------------------------------------------------------- floors

def floors(ceil, n, k, what):
  """(fwd, fwd+bwd) floor ms: bytes at the copy rate plus matmul flops at the matmul rate.

  Estimates, not strict lower bounds: bytes that are only read are priced at the
  read+write copy rate (HBM serves reads faster, so gathers can beat it: %fl > 100), and
  the matmul rate is one 8192^3 GEMM's (the MLP's GEMMs have run faster)."""
  bw, rate = ceil["copy_bytes_per_s"], ceil["matmul_flops_per_s"]
  pairs = T * k
  used = n * (1 - (1 - 1 / n) ** pairs)  # expected distinct experts
  row = D * 2
  tok = T * D * 2
  fwd_bytes = 2 * used * row + 2 * tok + pairs * 8
  bwd_bytes = 2 * used * row + 2 * n * row + 3 * tok + pairs * 8
  if what == "router":
    n_axis = int(round(n ** 0.5))
    return (T * 2 * n_axis * 4 + pairs * 8) / bw * 1e3, None
  if what == "expert":
    return fwd_bytes / bw * 1e3, (fwd_bytes + bwd_bytes) / bw * 1e3
  mlp_flops = 2 * T * D * F * 3 + 2 * T * D * 2 * int(round(n ** 0.5))
  return ((mlp_flops / rate + fwd_bytes / bw) * 1e3,
          (3 * mlp_flops / rate + (fwd_bytes + bwd_bytes) / bw) * 1e3)


# ----------------------------------------------------------------------------- table

def measure(fn, arg_sets, label, profile=0):
  """{label_ms: host-timed median, label_device_ms: device busy time a call}, and with
  `profile` > 0 the most expensive kernels (`label_kernels`) from the same trace."""
  events = benchlib.trace_calls(fn, arg_sets, DEVICE_CALLS)
  out = {f"{label}_ms": timeit(fn, arg_sets),
         f"{label}_device_ms": benchlib.busy_ms(events) / DEVICE_CALLS}
  if profile:
    out[f"{label}_kernels"] = benchlib.kernel_table(events, calls=DEVICE_CALLS, top=profile)
  return out


def time_case(what, impl, n, k, keys, profile=0, config=None):
  """fwd (and fwd+bwd, but for the router) of one case: `measure`'s keys for each. A
  `config` runs the layer's expert op with it (`layer`)."""
  sets = 3
  if what == "router":
    n_axis = int(round(n ** 0.5))
    args = [(log_probs(next(keys), T, n_axis), log_probs(next(keys), T, n_axis))
            for _ in range(sets)]
    f = jax.jit(lambda a, b: ops.cartesian_topk(a, b, k, impl=impl))
    return measure(f, args, "fwd", profile)
  if what == "expert":
    up, down = tables(next(keys), n)
    args = [(tokens_in(next(keys)), up, down) + routing(next(keys), n, k)
            for _ in range(sets)]
    fn, num_diff = lambda x, u, v, w, i: ops.atomic_experts(x, u, v, w, i, impl=impl), 4
  else:
    p = init_layer(next(keys), n)
    args = [(p, tokens_in(next(keys))) for _ in range(sets)]
    fn, num_diff = functools.partial(layer, k=k, impl=impl, config=config), 2
  cot = jax.random.normal(next(keys), (T, D), jnp.float32)
  return {**measure(jax.jit(fn), args, "fwd", profile),
          **measure(fwd_bwd(fn, num_diff), [(cot,) + a for a in args], "fwd_bwd", profile)}


def part_table(seed, ceil, device, path, profile=0, only=None):
  """Times every case; rewrites the JSON list at `path` after each one. Both impls of a
  case get the same inputs (keys drawn from the seed and the case, not the run order).
  `profile` > 0 adds each pallas layer row's most expensive kernels to its row; `only`
  (a set of "what:N:k" strings) times those rows alone."""
  rows = []
  say("\n== table (ms; bf16, T=4096, d=1024, F=4096)")
  say("host = host-timed median; dev = device busy time a call (profiler); x = xla / pallas "
      "(host); floor = bytes at the copy rate + flops at the matmul rate; %fl = floor / "
      "pallas dev")
  say(f"{'what':7s} {'N':>8s} {'k':>3s} | {'pallas fwd':>10s} {'dev':>6s} {'xla fwd':>8s} "
      f"{'dev':>6s} {'x':>5s} {'floor':>6s} {'%fl':>4s} | {'pallas f+b':>10s} {'dev':>6s} "
      f"{'xla f+b':>8s} {'dev':>6s} {'x':>5s} {'floor':>6s} {'%fl':>4s}")
  fmt = lambda v: f"{v:.3f}" if v is not None else "-"
  ratio = lambda a, b: f"{b / a:.1f}" if a and b else "-"
  percent = lambda floor, ms: f"{100 * floor / ms:.0f}" if floor and ms else "-"
  for w, what in enumerate(("router", "expert", "layer")):
    for c, (n, k) in enumerate(CASES):
      if only and f"{what}:{n}:{k}" not in only:
        continue
      fl = floors(ceil, n, k, what) if ceil else (None, None)
      case_seed = (seed * len(CASES) + c) * 3 + w
      res = {}
      for impl in ("pallas", "xla"):
        prof = profile if (what, impl) == ("layer", "pallas") else 0
        res[impl] = guarded(f"{what} {impl} N={n} k={k}",
                            lambda: time_case(what, impl, n, k, key_iter(case_seed), prof)
                            ) or {}
        rows.append({**dict(what=what, impl=impl, device=device, tokens=T, hidden=D,
                            ffn=F if what == "layer" else None, experts=n, k=k,
                            fwd_ms=None, fwd_bwd_ms=None, fwd_device_ms=None,
                            fwd_bwd_device_ms=None), **res[impl],
                     "fwd_floor_ms": fl[0], "fwd_bwd_floor_ms": fl[1]})
        with open(path, "w") as f:
          json.dump(rows, f, indent=1)
      cols = []
      for stage, floor in (("fwd", fl[0]), ("fwd_bwd", fl[1])):
        p, x = ({key: res[impl].get(f"{stage}_{key}") for key in ("ms", "device_ms")}
                for impl in ("pallas", "xla"))
        cols.append(f"{fmt(p['ms']):>10s} {fmt(p['device_ms']):>6s} {fmt(x['ms']):>8s} "
                    f"{fmt(x['device_ms']):>6s} {ratio(p['ms'], x['ms']):>5s} "
                    f"{fmt(floor):>6s} {percent(floor, p['device_ms']):>4s}")
      say(f"{what:7s} {n:8d} {k:3d} | {cols[0]} | {cols[1]}")
      for stage in ("fwd", "fwd_bwd"):
        for row in res["pallas"].get(f"{stage}_kernels", []):
          say(f"      {stage:7s} {row['ms_per_call']:8.4f} x{row['launches_per_call']:.0f} "
              f"{row['kernel'][:70]}")
  for line in target_lines(rows):
    say(line)
  return rows


def target_lines(rows):
  """Issue "Pallas kernels"' targets (k = 32) judged on one run's table rows: host-timed
  medians, device times in parentheses; a target whose rows were not timed says so."""
  def get(what, impl, n, stage):
    row = next((r for r in rows if (r["what"], r["impl"], r["experts"], r["k"])
                == (what, impl, n, 32)), {})
    return row.get(f"{stage}_ms"), row.get(f"{stage}_device_ms")

  def ratio(a, b):  # (host, device) of a / b; None where a figure is missing
    return tuple(x / y if x is not None and y else None for x, y in zip(a, b))

  def judge(label, figures, bound, unit, at_least=False):
    host, device = figures
    if host is None:
      return f"  {label}: not timed in this run"
    met = host >= bound if at_least else host <= bound
    dev = f" ({device:.3f}{unit} device)" if device is not None else ""
    return (f"  {label} {'>=' if at_least else '<='} {bound}{unit}: {host:.3f}{unit}{dev} "
            f"{'met' if met else 'MISSED'}")

  lines = ['\n== targets (issue "Pallas kernels", k = 32)']
  for what, n, stage, bound in (("router", 2 ** 20, "fwd", 0.2), ("expert", 65536, "fwd", 0.35),
                                ("expert", 65536, "fwd_bwd", 1.2), ("layer", 65536, "fwd", 0.33),
                                ("layer", 65536, "fwd_bwd", 1.1)):
    label = f"{what} N={'2^20' if n == 2 ** 20 else n} {stage}"
    lines.append(judge(label, get(what, "pallas", n, stage), bound, " ms"))
  for stage in ("fwd", "fwd_bwd"):
    ours = get("layer", "pallas", 65536, stage)
    lines.append(judge(f"layer N=65536 {stage}, plain XLA / pallas",
                       ratio(get("layer", "xla", 65536, stage), ours), 3, "x", at_least=True))
    lines.append(judge(f"layer N=2^20 / N=65536 {stage}",
                       ratio(get("layer", "pallas", 2 ** 20, stage), ours), 1.25, "x"))
  return lines


# ----------------------------------------------------------------------------- stages

def part_stages(seed):
  keys = key_iter(seed)
  out = {}
  cfg = expert_ops.ExpertConfig()
  for n, k in STAGE_CASES:
    up, down = tables(next(keys), n)
    x, dy = tokens_in(next(keys)), tokens_in(next(keys))
    sets = [routing(next(keys), n, k) for _ in range(4)]
    w, idx = sets[0]
    s = jax.jit(lambda x, u, v, w, i: expert_tokens.forward(
        x, u, v, w, i, activation="silu", config=cfg.forward, interpret=INTERPRET))(
            x, up, down, w, idx)[1]
    bwd = jax.jit(lambda dy, u, v, w, i, s: expert_tokens.token_backward(
        dy, u, v, w, i, s, activation="silu", config=cfg.backward, interpret=INTERPRET))
    _, _, ds, a = bwd(dy, up, down, w, idx, s)
    res = {}
    n_axis = int(round(n ** 0.5))
    lxs = [(log_probs(next(keys), T, n_axis), log_probs(next(keys), T, n_axis))
           for _ in range(4)]
    res["router kernel"] = timeit_unrolled(lambda a, b: router_topk.cartesian_topk(a, b, k), lxs)
    res["router xla"] = timeit_unrolled(lambda a, b: reference.cartesian_topk(a, b, k), lxs)
    res["fwd kernel"] = timeit(jax.jit(lambda w, i: expert_tokens.forward(
        x, up, down, w, i, activation="silu", config=cfg.forward, interpret=INTERPRET)), sets)
    res["bwd token kernel"] = timeit(jax.jit(lambda w, i: bwd(dy, up, down, w, i, s)), sets)
    bucket = expert_tables.auto_bucket_size(cfg.tables, T * k, n)
    for method in bucketing.METHODS:
      res[f"bucketing {method} (B={bucket})"] = timeit_unrolled(
          lambda w, i: bucketing.bucket_pairs(i, n, bucket, method=method,
                                              interpret=INTERPRET), sets)
    res["table grads (incl. bucketing)"] = timeit(jax.jit(
        lambda w, i: expert_tables.table_gradients(
            x, dy, i, ds, a, num_experts=n, up_dtype=BF16, down_dtype=BF16,
            config=cfg.tables, interpret=INTERPRET)), sets)
    p = init_layer(next(keys), n)
    res["mlp fwd"] = timeit(jax.jit(benchlib.shared_mlp), [(p, x)])
    res["mlp fwd+bwd"] = timeit(fwd_bwd(benchlib.shared_mlp, 2), [(dy.astype(jnp.float32), p, x)])
    res["gates fwd"] = timeit(jax.jit(gates), [(p, x)])
    say(f"\n== stages N={n} k={k} (ms)")
    for name, ms in res.items():
      say(f"  {name:34s} {ms:8.4f}")
    out[f"N={n},k={k}"] = res
  return out


# ----------------------------------------------------------------------------- sweep

# (block_t, num_warps, merge, axis_topk) of the router sweep; 0 and "auto": what the
# default picks
ROUTER_SWEEP_CONFIGS = [
    *((bt, nw, merge, "argmax") for bt, nw, merge in [
        (0, 0, "auto"), (1, 1, "grid"), (1, 2, "grid"), (2, 1, "grid"), (2, 2, "grid"),
        (4, 2, "grid"), (4, 4, "grid"), (8, 4, "grid"), (1, 1, "staircase"),
        (1, 2, "staircase"), (2, 1, "staircase"), (2, 2, "staircase"), (4, 2, "staircase")]),
    *((bt, nw, merge, "bisect") for bt, nw, merge in [
        (0, 0, "auto"), (1, 1, "staircase"), (1, 2, "staircase"), (1, 4, "staircase"),
        (2, 2, "staircase"), (2, 1, "grid"), (1, 2, "grid")])]


def part_sweep(seed, kinds, cases):
  keys = key_iter(seed)
  out = {}
  say("\n== sweep: router (block_t, num_warps, merge, axis_topk) -> ms (unrolled)")
  for n_axis, k in ROUTER_SWEEP if "router" in kinds else []:
    lxs = [(log_probs(next(keys), T, n_axis), log_probs(next(keys), T, n_axis))
           for _ in range(4)]
    want = router_topk.cartesian_topk(*lxs[0], k)
    for bt, nw, merge, axis_topk in ROUTER_SWEEP_CONFIGS:
      cfg = router_topk.RouterConfig(block_t=bt, num_warps=nw, merge=merge,
                                     axis_topk=axis_topk)
      fn = lambda a, b, cfg=cfg: router_topk.cartesian_topk(a, b, k, config=cfg)
      same = all(bool(jnp.array_equal(g, w)) for g, w in zip(fn(*lxs[0]), want))
      ms = guarded(f"router {cfg}", lambda: timeit_unrolled(fn, lxs))
      out[f"router n={n_axis} k={k} bt={bt} nw={nw} merge={merge} axis_topk={axis_topk}"] = ms
      say(f"  n={n_axis:5d} k={k:3d} bt={bt:2d} nw={nw} {merge:9s} {axis_topk:6s}: {ms}"
          f"{'' if same else '  DIFFERS from the default'}")
  token_cfgs = [(2, 64, 2, 3), (4, 64, 4, 2), (2, 128, 4, 2), (1, 256, 4, 2), (2, 256, 8, 2),
                (1, 512, 8, 2), (4, 128, 8, 2), (8, 64, 8, 2), (4, 32, 4, 3), (1, 128, 4, 3)]
  for n, k in cases:
    up, down = tables(next(keys), n)
    x, dy = tokens_in(next(keys)), tokens_in(next(keys))
    sets = [routing(next(keys), n, k) for _ in range(3)]
    s = expert_tokens.forward(x, up, down, *sets[0], activation="silu",
                              config=expert_tokens.TokenConfig(), interpret=INTERPRET)[1]
    say(f"\n== sweep N={n} k={k}: token kernels (block_t, block_d, warps, stages) -> "
        f"fwd ms, bwd-token ms")
    for bt, bd, nw, ns in token_cfgs if "tokens" in kinds else []:
      cfg = expert_tokens.TokenConfig(bt, bd, nw, ns)
      f = guarded(f"fwd {cfg}", lambda: timeit(jax.jit(lambda w, i: expert_tokens.forward(
          x, up, down, w, i, activation="silu", config=cfg, interpret=INTERPRET)), sets))
      b = guarded(f"bwd {cfg}", lambda: timeit(jax.jit(
          lambda w, i: expert_tokens.token_backward(
              dy, up, down, w, i, s, activation="silu", config=cfg, interpret=INTERPRET)), sets))
      out[f"tokens N={n} {cfg}"] = (f, b)
      say(f"  {bt:2d} {bd:4d} {nw} {ns}: fwd {f}  bwd {b}")
    _, _, ds, a = expert_tokens.token_backward(
        dy, up, down, *sets[0], s, activation="silu", config=expert_tokens.TokenConfig(),
        interpret=INTERPRET)
    say(f"== sweep N={n} k={k}: table grads (block_p, block_d, warps, stages, bucket) -> "
        f"ms host, device; outputs equal to the first config's?")
    want = None
    for bp, bd, nw, ns, be in TABLE_SWEEP if "tables" in kinds else []:
      cfg = expert_tables.TableConfig(bucket_size=be, block_p=bp, block_d=bd, num_warps=nw,
                                      num_stages=ns)
      fn = jax.jit(lambda w, i, cfg=cfg: expert_tables.table_gradients(
          x, dy, i, ds, a, num_experts=n, up_dtype=BF16, down_dtype=BF16, config=cfg,
          interpret=INTERPRET))
      got = guarded(f"tables {cfg}", lambda: fn(*sets[0]))
      want = got if want is None else want
      same = got is not None and max(rel_err(g, w) for g, w in zip(got, want)) < 1e-2
      ms = guarded(f"tables {cfg}", lambda: measure(fn, sets, "tables"))
      out[f"tables N={n} {cfg}"] = ms
      say(f"  {bp:3d} {bd:4d} {nw} {ns} {be or 'auto'}: "
          f"{ms and round(ms['tables_ms'], 4)} {ms and round(ms['tables_device_ms'], 4)}"
          f"{'' if same else '  DIFFERS'}")
  return out


# ----------------------------------------------------------------------------- variants

BUCKET_SCORES = expert_ops.ExpertConfig(pair_scores="buckets")
EXPERT_VARIANTS = {  # (N, k) -> name -> ExpertConfig (earlier variants: kernels_notes.md)
    (n, 32): {"default": expert_ops.ExpertConfig(), "pair scores in buckets": BUCKET_SCORES}
    for n in (65536, 2 ** 20)}
LAYER_VARIANTS = [  # (N, k, impl, config name)
    (n, 32, "pallas", name) for n in (65536, 2 ** 20)
    for name in ("default", "pair scores in buckets")]


SCALING_NS = tuple(2 ** e for e in range(12, 23, 2))  # 64^2 .. 2048^2


def part_scaling(seed, device, path):
  """Router alone and layer fwd / fwd+bwd against N at k = 32 (pallas, xla): routing
  should grow like sqrt(N), execution stay flat once N exceeds the touched rows."""
  keys = key_iter(seed)
  rows = []
  say("\n== scaling with N (k=32; ms): router fwd | layer fwd | layer fwd+bwd")
  for n in SCALING_NS:
    for impl in ("pallas", "xla"):
      router = guarded(f"scaling router {impl} N={n}",
                       lambda: time_case("router", impl, n, 32, keys)) or {}
      lay = guarded(f"scaling layer {impl} N={n}",
                    lambda: time_case("layer", impl, n, 32, keys)) or {}
      rows.append(dict(impl=impl, device=device, tokens=T, hidden=D, ffn=F, experts=n, k=32,
                       router_ms=router.get("fwd_ms"), layer_fwd_ms=lay.get("fwd_ms"),
                       layer_fwd_bwd_ms=lay.get("fwd_bwd_ms")))
      fmt = lambda v: "-" if v is None else f"{v:.3f}"
      say(f"  N={n:8d} {impl:6s} {fmt(rows[-1]['router_ms']):>8s} | "
          f"{fmt(rows[-1]['layer_fwd_ms']):>8s} | {fmt(rows[-1]['layer_fwd_bwd_ms']):>8s}")
      with open(path, "w") as f:
        json.dump(rows, f, indent=1)
  return rows


def plot_scaling(path):
  """Log-log figure of the scaling rows at `path` (a PNG beside it)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(path) as f:
    rows = json.load(f)
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for impl, style in (("pallas", "-"), ("xla", "--")):
    mine = [r for r in rows if r["impl"] == impl]
    for key, label in (("router_ms", "router top-k"), ("layer_fwd_ms", "layer fwd"),
                       ("layer_fwd_bwd_ms", "layer fwd+bwd")):
      pts = [(r["experts"], r[key]) for r in mine if r[key]]
      if pts:
        ax.plot(*zip(*pts), style, marker="o", label=f"{label} ({impl})")
  ns = [r["experts"] for r in rows]
  ref = min(r["router_ms"] for r in rows if r["impl"] == "pallas" and r["router_ms"])
  ax.plot(ns, [ref * (n / ns[0]) ** 0.5 for n in ns], ":", color="gray", label="~ sqrt(N)")
  ax.set(xscale="log", yscale="log", xlabel="atomic experts N", ylabel="ms",
         title=f"T={T}, d={D}, F={F}, k=32, bf16 ({rows[0]['device']})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path.replace(".json", ".png"), dpi=120)
  print(path.replace(".json", ".png"))


def part_variants(seed, save):
  """Expert-op and layer variants side by side (fwd, fwd+bwd: host ms and device ms;
  expert variants with their bf16 relative errors of y, dx, dU, dV, dw against the
  float32 reference)."""
  keys = key_iter(seed)
  out = {}
  fmt = lambda row: " ".join(f"{key} {value:.4f}" for key, value in row.items())
  for (n, k), configs in EXPERT_VARIANTS.items():
    up, down = tables(next(keys), n)
    args = [(tokens_in(next(keys)), up, down) + routing(next(keys), n, k) for _ in range(3)]
    cot = jax.random.normal(next(keys), (T, D), jnp.float32)
    xla = lambda x, u, v, w, i: reference.atomic_experts(x, u, v, w, i)
    f32 = [a.astype(jnp.float32) for a in args[0][:4]] + [args[0][4]]
    with jax.default_matmul_precision("highest"):
      want = [jax.jit(xla)(*f32)] + list(fwd_bwd(xla, 4)(cot, *f32)[1])
    say(f"\n== variants: expert op N={n} k={k} (ms; rel err y dx dU dV dw)")
    for name, cfg in configs.items():
      def run():
        fn = lambda x, u, v, w, i: expert_ops.atomic_experts(x, u, v, w, i, config=cfg)
        fb = fwd_bwd(fn, 4)
        got = [jax.jit(fn)(*args[0])] + list(fb(cot, *args[0])[1])
        errs = [rel_err(g, wt) for g, wt in zip(got, want)]
        return ({**measure(jax.jit(fn), args, "fwd"),
                 **measure(fb, [(cot,) + a for a in args], "fwd_bwd")}, errs)
      row = guarded(f"expert {name}", run)
      out[f"expert N={n} k={k} {name}"] = row
      if row:
        say(f"  {name:24s} {fmt(row[0])} err " + " ".join(f"{e:.1e}" for e in row[1]))
      save(out)
  say("\n== variants: layer (ms)")
  for n, k, impl, name in LAYER_VARIANTS:
    cfg = EXPERT_VARIANTS[n, k][name]
    label = f"layer N={n} k={k} {impl} {name}"
    out[label] = row = guarded(label, lambda: time_case("layer", impl, n, k, keys,
                                                        config=cfg))
    if row:
      say(f"  {label:44s} {fmt(row)}")
    save(out)
  return out


# ----------------------------------------------------------------------------- module

MODULE_CASES = [(65536, 32), (2 ** 20, 32)]


def part_module(seed, profile: int = 0):
  """The Flax `OmniMoELayer` as the LM runs it (train=True: batch statistics, router
  stats; bf16 compute) with float32 and with bf16 parameters, next to the table's `layer`
  function (bf16 parameters, log-softmax gates, no stats). fwd = apply; fwd+bwd = grads
  of <y, cot> wrt the parameters and x. Pallas path. `profile` > 0 also lists that many
  most expensive kernels of each row's fwd+bwd (`benchlib.kernel_times`)."""
  from omnimoe.layers import OmniMoELayer  # flax + ml_collections: only this part needs them
  keys = key_iter(seed)
  out = {}
  say("\n== module: Flax OmniMoELayer (train=True) vs the layer function (ms)")
  for n, k in MODULE_CASES:
    xs = [tokens_in(next(keys)) for _ in range(3)]
    cot = jax.random.normal(next(keys), (T, D), jnp.float32)
    p = init_layer(next(keys), n)
    fn = functools.partial(layer, k=k, impl="pallas")
    rows = {"layer function": (jax.jit(fn), fwd_bwd(fn, 2), p)}
    for param_dtype, norm in ((jnp.float32, "batchnorm"), (BF16, "batchnorm"), (BF16, "none")):
      mod = OmniMoELayer(n, k, F, router_norm=norm, impl="pallas", dtype=BF16,
                         param_dtype=param_dtype)
      variables = mod.init(jax.random.key(seed), xs[0], train=True)
      params, state = variables["params"], {c: v for c, v in variables.items() if c != "params"}

      def apply(params, x, mod=mod, state=state):
        (y, aux), _ = mod.apply({"params": params, **state}, x, train=True,
                                mutable=list(state))
        return y, aux

      y_only = lambda params, x, apply=apply: apply(params, x)[0]
      rows[f"module params {jnp.dtype(param_dtype).name} norm {norm}"] = (
          jax.jit(apply), fwd_bwd(y_only, 2), params)
    for name, (fwd, fb, params) in rows.items():
      label = f"N={n} k={k} {name}"

      def run(fwd=fwd, fb=fb, params=params):
        times = (timeit(fwd, [(params, x) for x in xs]),
                 timeit(fb, [(cot, params, x) for x in xs]))
        kernels = (benchlib.kernel_times(lambda: fb(cot, params, xs[0]), top=profile)
                   if profile else [])
        return times, kernels
      got = guarded(label, run)
      out[label] = got and got[0]
      if got:
        say(f"  {label:50s} fwd {got[0][0]:.4f} f+b {got[0][1]:.4f}")
        for row in got[1]:
          say(f"      {row['ms_per_call']:8.4f} x{row['launches_per_call']:.0f} {row['kernel'][:60]}")
        if got[1]:
          out[label + " kernels"] = got[1]
  return out


# ----------------------------------------------------------------------------- main

def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--parts", default="check,ceilings,table,stages",
                      help="comma-separated subset of check,ceilings,table,stages,variants,"
                           "module,scaling,sweep")
  parser.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep", default="router,tokens,tables",
                      help="what the sweep part tunes: router, tokens, tables")
  parser.add_argument("--checks", default=",".join(CHECKS),
                      help="what the check part checks: " + ",".join(CHECKS))
  parser.add_argument("--sweep-cases", default="65536,1048576",
                      help="N values (k = 32) of the token and table sweeps")
  parser.add_argument("--profile", type=int, default=0,
                      help="module and table parts: also list this many most expensive "
                           "kernels per row (table: the pallas layer rows)")
  parser.add_argument("--only", help="table part: time only these comma-separated rows, "
                                     "each what:N:k (e.g. layer:65536:32)")
  parser.add_argument("--plot-scaling", help="draw the figure of this scaling JSON and exit")
  args = parser.parse_args()
  if args.plot_scaling:
    return plot_scaling(args.plot_scaling)
  parts = args.parts.split(",")
  device = jax.devices()[0].device_kind
  tag = benchlib.device_tag(device)
  say(benchlib.run_header())
  detail = dict(device=device, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
  os.makedirs(args.out, exist_ok=True)

  def save():
    with open(os.path.join(args.out, f"kernels-{tag}-detail.json"), "w") as f:
      json.dump(detail, f, indent=1, default=str)
    with open(os.path.join(args.out, f"kernels-{tag}-log.txt"), "w") as f:
      f.write("\n".join(LOG) + "\n")

  ceil = None
  if "check" in parts:
    detail["check"] = part_check(args.seed, args.checks.split(","))
    save()
  if "ceilings" in parts:
    ceil = detail["ceilings"] = guarded("ceilings", lambda: benchlib.ceilings(args.seed + 1))
    save()
  if "table" in parts:
    part_table(args.seed + 4, ceil, device, os.path.join(args.out, f"kernels-{tag}.json"),
               args.profile, set(args.only.split(",")) if args.only else None)
    if ceil:
      detail["floors_ms"] = {f"{w} N={n} k={k}": floors(ceil, n, k, w)
                             for w in ("router", "expert", "layer") for n, k in CASES}
    save()
  if "stages" in parts:
    detail["stages"] = guarded("stages", lambda: part_stages(args.seed + 3))
    save()
  if "variants" in parts:
    def save_variants(out):
      detail["variants"] = out
      save()
    part_variants(args.seed + 5, save_variants)
  if "module" in parts:
    detail["module"] = part_module(args.seed + 7, args.profile)
    save()
  if "scaling" in parts:
    part_scaling(args.seed + 6, device, os.path.join(args.out, f"scaling-{tag}.json"))
  if "sweep" in parts:
    detail["sweep"] = part_sweep(args.seed + 2, args.sweep.split(","),
                                 [(int(n), 32) for n in args.sweep_cases.split(",")])
    save()


if __name__ == "__main__":
  main()
