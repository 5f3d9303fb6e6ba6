"""The paper's headline regime on one GPU: k in the thousands, N = 102,400 (320 x 320).

  PYTHONPATH=. python3 experiments/bench_headline.py --out $OUT          # on the GPU
  python experiments/bench_headline.py --plot experiments/results/headline-<device>.json

The paper (Appendix B, Table A) times the FFN forward at N = 102,400, d = 1024, shared MLP
width 1024, k in {512, 1024, 2048, 4096}, 1K-16K tokens: OmniMoE 6.7 ms against PEER's
73 ms at 4096 tokens. Neither released implementation runs this setting. Here, in one run:

  omnimoe  router (BatchNorm'd gates, log-softmax, exact top-k) + shared SwiGLU MLP +
           routed branch, in three implementations:
             pallas      the model's path (`impl="pallas"`): where
                         `router.routes_by_rule` (k in the thousands, the dense regime)
                         the whole grid as GEMMs routed by the top-k's membership rule,
                         no pairs (`router.select_rule`, `expert_rule`); elsewhere the
                         unsorted top-k's pairs, and the expert op picks by density
             xla-dense   plain XLA: exact top-k (`omnimoe.reference`), then the routed
                         branch dense-masked: S = X U^T over all N, G the routing weights
                         scattered into (T, N), y = (G * silu(S)) V
             xla-gather  plain XLA: exact top-k, then the token-centric gather of
                         `omnimoe.reference.atomic_experts` (how PEER is usually written;
                         in chunks of pairs once one gather passes 2^30 elements)
           forward for all, forward+backward for pallas and xla-dense, and the router alone.
  peer     PEER (no shared branch; product-key retrieval per head, softmax over each head's
           k, gelu experts) at N = 102,400 with k = heads x k_head active experts, as
           usually written (xla-gather) and on our kernels (pallas).

`--crossover` instead times the competing paths where the dispatch rules switch: the expert
op alone on the token kernels and on the dense GEMMs (N from 4096 to 2^20), and the router
on the fused kernel and on the threshold kernels (crossover-<device>.json).
`--router-configs` times the router's stages and the threshold search's launch parameters
(router-configs-<device>.json; every config's output checked against the default's).
Peak memory is XLA's accounting of each compiled program; a case whose program needs
more than the device has is recorded with peak_gib and no time ("does not fit"), not run.

Every impl of a case gets the same inputs: parameters and tokens are drawn from --seed,
the model and the token count only (not from the run order), so pallas and plain XLA
route the same tokens at every k, also across separate `--only` runs with one seed.
For T <= 4096 the pallas FFNs' outputs are checked against plain XLA's (OmniMoE against
xla-dense, PEER against xla-gather) before it is timed: relative error
||out - ref|| / ||ref|| above REL_TOL (1e-2, the bf16 bound of the method) or NaN fails
the check; such a case is recorded with its rel_err, status "check failed" and no times,
printed as FAILED, and the run exits non-zero after writing every row (as it does when a
case raises).

Writes headline-<device>.json (one object per case: model, impl, what, device, tokens,
hidden, experts, k, fwd_ms, fwd_bwd_ms, peak_gib, fwd_bwd_peak_gib, rel_err (null where
not checked), rel_err_vs (the impl checked against), status: "timed", "does not fit",
"check failed" or "error") and a log; `--plot` draws latency against active parameters
and against tokens (the paper's Figure 4, our figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from experiments.benchlib import (BF16, fwd_bwd, guarded, key_iter, peak_gib, say, timeit,
                                  timeit_unrolled)
from omnimoe import ops, reference
from omnimoe import router as router_lib
from omnimoe.pallas import expert_rule

N_AXIS = 320
N = N_AXIS * N_AXIS
D = 1024
F = 1024
KS = (512, 1024, 2048, 4096)
TOKENS = (1024, 4096, 16384)
PEER_HEADS = 10  # the paper does not give PEER's head count for Table A
PEER_K_HEAD = (125, 250, 500, 1250)  # 1250 .. 12,500 active experts (Table A's range)
PEER_KEY_DIM = 256
BN_EPS = 1e-5
MODELS = ("omnimoe", "peer")
CHECK_MAX_TOKENS = 4096  # the pallas FFN is checked against plain XLA up to this T
REL_TOL = 1e-2  # bf16 operands: relative error between 1e-3 and 1e-2 (METHOD.md)


def scaled_normal(key, shape, fan_in):
  return (jax.random.normal(key, shape) / np.sqrt(fan_in)).astype(BF16)


def init(key, peer: bool):
  ks = jax.random.split(key, 7)
  p = dict(up=scaled_normal(ks[0], (N, D), D), down=scaled_normal(ks[1], (N, D), D))
  if peer:
    p["query"] = scaled_normal(ks[2], (D, PEER_HEADS * PEER_KEY_DIM), D)
    p["keys"] = scaled_normal(ks[3], (2, PEER_KEY_DIM // 2, N_AXIS), PEER_KEY_DIM // 2)
    return p
  p.update(rx=scaled_normal(ks[2], (D, N_AXIS), D), ry=scaled_normal(ks[3], (D, N_AXIS), D),
           w_gate_up=scaled_normal(ks[4], (D, 2, F), D), wd=scaled_normal(ks[6], (F, D), F))
  return p


def router_log_probs(p, x):
  """(lx, ly) float32: gates, BatchNorm with batch statistics (no affine), log-softmax."""
  def axis(gate):
    logits = ops.gate_logits(x, gate, x.dtype)  # as the model's router
    mean = logits.mean(0)
    var = jnp.mean(jnp.square(logits - mean), 0)
    return jax.nn.log_softmax((logits - mean) * jax.lax.rsqrt(var + BN_EPS), axis=-1)
  return axis(p["rx"]), axis(p["ry"])


def top_k(lx, ly, k, impl):
  if impl == "pallas":
    return ops.cartesian_topk(lx, ly, k, impl="pallas", sorted=False)
  return reference.cartesian_topk(lx, ly, k)


def dense_masked(x, up, down, weights, indices, activation):
  """The routed branch over all N experts, masked to the routed pairs (plain XLA)."""
  tokens = jnp.arange(x.shape[0])[:, None]
  g = jnp.zeros((x.shape[0], up.shape[0]), jnp.float32).at[tokens, indices].add(weights)
  s = jnp.dot(x, up.T, preferred_element_type=jnp.float32)
  a = (g * reference.ACTIVATIONS[activation](s)).astype(x.dtype)
  return jnp.dot(a, down, preferred_element_type=jnp.float32).astype(x.dtype)


def experts(x, p, weights, indices, impl, activation, unique):
  """The routed branch; `unique`: no token lists an expert twice (OmniMoE's top-k; PEER's
  heads may pick the same expert)."""
  if impl == "pallas":
    return ops.atomic_experts(x, p["up"], p["down"], weights, indices,
                              activation=activation, impl="pallas", unique_indices=unique)
  if impl == "xla-dense":
    return dense_masked(x, p["up"], p["down"], weights, indices, activation)
  return reference.atomic_experts(x, p["up"], p["down"], weights, indices, activation)


def by_rule(x, k, impl, rule=None) -> bool:
  """Whether the routed branch routes by the top-k's rule: `rule` if given, else as the
  model's OmniMoE layer does for these tokens."""
  if rule is not None:
    return rule
  return impl == "pallas" and router_lib.routes_by_rule(x.shape[0], k, N, "exp", "silu", impl)


def omnimoe_ffn(p, x, *, k, impl, rule=None, rule_config=expert_rule.RuleConfig()):
  """Shared SwiGLU MLP + Cartesian router + atomic experts (routing weights exp(score)).
  impl "pallas" routes as the model does: by the rule (`expert_rule`, `rule_config`) or by
  pairs; `rule` True or False forces one (experiments/bench_rule.py)."""
  lx, ly = router_log_probs(p, x)
  if by_rule(x, k, impl, rule):
    routed = expert_rule.atomic_experts_rule(x, p["up"], p["down"], lx, ly,
                                             *router_lib.select_rule(lx, ly, k),
                                             config=rule_config)
  else:
    weights, idx = router_lib.select_pairs(lx, ly, k, "exp",  # the model's
                                           "pallas" if impl == "pallas" else "xla")
    routed = experts(x, p, weights, idx, impl, "silu", unique=True)
  return benchlib.shared_mlp(p, x) + routed


def omnimoe_router(p, x, *, k, impl, rule=None):
  """What the FFN's routed branch consumes: (theta, cut) by the rule, else the pairs."""
  if by_rule(x, k, impl, rule):
    return router_lib.select_rule(*router_log_probs(p, x), k)
  return top_k(*router_log_probs(p, x), k, impl)


def peer_ffn(p, x, *, k, impl):
  """PEER: per head a query, product keys over the 320 x 320 grid, top-k, softmax."""
  t = x.shape[0]
  q = (x @ p["query"]).astype(jnp.float32).reshape(t * PEER_HEADS, PEER_KEY_DIM)
  half = PEER_KEY_DIM // 2
  lx, ly = (jax.nn.log_softmax(q[:, i * half:(i + 1) * half] @ p["keys"][i].astype(jnp.float32),
                               axis=-1) for i in range(2))
  scores, idx = top_k(lx, ly, k, "pallas" if impl == "pallas" else "xla")
  weights = jax.nn.softmax(scores, axis=-1)
  return experts(x, p, weights.reshape(t, -1), idx.reshape(t, -1), impl, "gelu", unique=False)


def device_gib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit", 80 * 2 ** 30) / 2 ** 30


def model_params(seed, model):
  """A model's parameters, drawn from the seed and the model only."""
  return init(jax.random.fold_in(jax.random.PRNGKey(seed), 2 * MODELS.index(model)),
              model == "peer")


def case_inputs(seed, model, tokens):
  """(xs, cot) shared by every impl and k of a (model, tokens) case: two token sets (the
  timing rotates over both; the check uses the first) and the fwd+bwd cotangent, drawn
  from the seed, the model and the token count only."""
  key = jax.random.fold_in(
      jax.random.fold_in(jax.random.PRNGKey(seed), 2 * MODELS.index(model) + 1), tokens)
  kx0, kx1, kc = jax.random.split(key, 3)
  xs = [benchlib.tokens_in(kx, tokens, D) for kx in (kx0, kx1)]
  return xs, jax.random.normal(kc, (tokens, D), jnp.float32)


def check_failed(rel_err) -> bool:
  return not rel_err <= REL_TOL  # NaN fails


def unmeasured(status):
  """A case's measured fields with nothing measured yet (`run_case` fills them in)."""
  return dict(fwd_ms=None, fwd_bwd_ms=None, peak_gib=None, fwd_bwd_peak_gib=None,
              rel_err=None, rel_err_vs=None, status=status)


def run_case(model, what, impl, tokens, k, p, inputs, want_bwd):
  """One case's measured fields: fwd_ms, fwd_bwd_ms, peak_gib, fwd_bwd_peak_gib (peaks
  of the forward and of the fwd+bwd programs), rel_err and rel_err_vs (the pallas FFN's
  output against plain XLA's for T <= CHECK_MAX_TOKENS, else None) and status. Times are
  None where the program would not fit, and where the check fails: a wrong output is
  not timed. `inputs`: `case_inputs` of (model, tokens), the same for every impl."""
  fn = dict(omnimoe=omnimoe_ffn, router=omnimoe_router, peer=peer_ffn)[
      "router" if what == "router" else model]
  f = jax.jit(lambda p, x: fn(p, x, k=k, impl=impl))
  xs, cot = inputs
  args = [(p, x) for x in xs]
  out = unmeasured("does not fit")
  out["peak_gib"] = peak_gib(f, *args[0])
  if out["peak_gib"] > 0.95 * device_gib():
    return out
  if impl.startswith("pallas") and what == "ffn" and tokens <= CHECK_MAX_TOKENS:
    other = "xla-dense" if model == "omnimoe" else "xla-gather"
    want = jax.jit(lambda p, x: fn(p, x, k=k, impl=other))(*args[0])
    err = benchlib.rel_err(f(*args[0]), want)
    out.update(rel_err=err, rel_err_vs=other)
    if check_failed(err):
      say(f"  check FAILED: pallas vs {other} relative error {err:.1e} > {REL_TOL:.0e}; "
          "not timed")
      out["status"] = "check failed"
      return out
    say(f"  check: pallas vs {other} relative error {err:.1e} (<= {REL_TOL:.0e})")
  out.update(fwd_ms=timeit(f, args), status="timed")
  if want_bwd:
    g = fwd_bwd(lambda p, x: fn(p, x, k=k, impl=impl), 2)
    out["fwd_bwd_peak_gib"] = peak_gib(g, cot, *args[0])
    if out["fwd_bwd_peak_gib"] <= 0.95 * device_gib():
      out["fwd_bwd_ms"] = timeit(g, [(cot,) + a for a in args])
  return out


# Where the paths cross. Expert op (T = 4096): (N, k values) timed on the token kernels
# and on the dense GEMMs. Router: (tokens, n, k values) on the fused kernel and
# on the threshold kernels (PEER's 10 heads x 4096 tokens give the 40,960 rows).
CROSSOVER_EXPERTS = ((4096, (16, 32, 64, 128)), (N, (128, 160, 192, 256)),
                     (2 ** 20, (512, 2048)))
CROSSOVER_ROUTER = ((4096, 320, (32, 48, 64, 128)), (40960, 320, (32, 48, 64, 125)),
                    (4096, 1024, (32, 48, 64, 128)))
# Decoding: few tokens at the headline's N and large k (generation's calls).
CROSSOVER_DECODE = ((1, 16, 64), (512, 4096))  # (token counts, k values)


def fmt(value, spec):
  return "-" if value is None else format(value, spec)


def crossover(args, device, tag):
  """Times the competing paths around `expert_ops.choose_path` and the router's
  `MAX_KERNEL_K` dispatch, and the expert op's forward for few tokens at large k, the
  parts named by `--crossover-parts`; writes crossover-<device>.json."""
  keys = key_iter(args.seed + 1)
  rows = []

  def record(row, label):
    rows.append(dict(row, device=device))
    say(f"{label:58s} fwd {fmt(row['fwd_ms'], '8.3f')}  "
        f"fwd+bwd {fmt(row.get('fwd_bwd_ms'), '8.3f')}")
    with open(os.path.join(args.out, f"crossover-{tag}.json"), "w") as f:
      json.dump(rows, f, indent=1)

  names = args.crossover_parts.split(",")
  if not set(names) <= set(CROSSOVER_PARTS):
    raise ValueError(f"--crossover-parts: unknown {sorted(set(names) - set(CROSSOVER_PARTS))}; "
                     f"choose from {','.join(CROSSOVER_PARTS)}")
  for name in names:
    CROSSOVER_PARTS[name](keys, record)


def _crossover_experts(keys, record):
  from omnimoe.pallas import expert_ops
  say(f"\n== crossover: expert op alone, T=4096 d={D} (ms)")
  for n_experts, ks in CROSSOVER_EXPERTS:
    n_axis = int(round(n_experts ** 0.5))
    up, down = benchlib.tables(next(keys), n_experts, D)
    for k in ks:
      lx, ly = (benchlib.log_probs(next(keys), 4096, n_axis) for _ in range(2))
      scores, idx = ops.cartesian_topk(lx, ly, k, impl="pallas", sorted=False)
      sets = [(benchlib.tokens_in(next(keys), 4096, D), up, down,
               jnp.exp(scores).astype(BF16), idx)]
      cot = jax.random.normal(next(keys), (4096, D), jnp.float32)
      for path in ("tokens", "dense"):
        op = functools.partial(expert_ops.atomic_experts,
                               config=expert_ops.ExpertConfig(path=path))
        fwd, fb = guarded(f"crossover {path} N={n_experts} k={k}", lambda: (
            timeit(jax.jit(op), sets), timeit(fwd_bwd(op, 4), [(cot,) + sets[0]]))
        ) or (None, None)
        chosen = expert_ops.choose_path(4096, k, n_experts)
        record(dict(what="expert", path=path, tokens=4096, hidden=D, experts=n_experts, k=k,
                    fwd_ms=fwd, fwd_bwd_ms=fb, chosen=chosen),
               f"expert {path:6s} N={n_experts} k={k} (auto: {chosen})")


def _crossover_router(keys, record):
  from omnimoe.pallas import router_threshold, router_topk
  say("\n== crossover: router top-k alone (ms)")
  kernels = dict(
      fused=lambda lx, ly, k: router_topk.cartesian_topk(
          lx, ly, k, config=router_topk.RouterConfig(max_kernel_k=k)),
      threshold=lambda lx, ly, k: router_threshold.cartesian_topk(lx, ly, k, sorted=False),
      threshold_sorted=lambda lx, ly, k: router_threshold.cartesian_topk(lx, ly, k))
  for tokens, n_axis, ks in CROSSOVER_ROUTER:
    for k in ks:
      sets = [tuple(benchlib.log_probs(next(keys), tokens, n_axis) for _ in range(2))]
      for name, fn in kernels.items():
        fwd = guarded(f"crossover router {name} T={tokens} n={n_axis} k={k}", lambda: timeit(
            jax.jit(functools.partial(fn, k=k)), sets))
        record(dict(what="router", path=name, tokens=tokens, experts=n_axis ** 2, k=k,
                    fwd_ms=fwd), f"router {name:16s} T={tokens} n={n_axis} k={k}")


def _crossover_decode(keys, record):
  from omnimoe.pallas import expert_ops
  say(f"\n== crossover: expert op forward, few tokens (decoding), N={N} d={D} (ms; "
      "relative error against the plain-XLA gather)")
  n_axis = int(round(N ** 0.5))
  up, down = benchlib.tables(next(keys), N, D)
  for k in CROSSOVER_DECODE[1]:
    for tokens in CROSSOVER_DECODE[0]:
      lx, ly = (benchlib.log_probs(next(keys), tokens, n_axis) for _ in range(2))
      scores, idx = ops.cartesian_topk(lx, ly, k, impl="pallas", sorted=False)
      args = (benchlib.tokens_in(next(keys), tokens, D), up, down,
              jnp.exp(scores).astype(BF16), idx)
      want = jax.jit(reference.atomic_experts)(*args)
      for path in ("tokens", "dense", "xla"):
        op = (reference.atomic_experts if path == "xla" else functools.partial(
            expert_ops.atomic_experts, config=expert_ops.ExpertConfig(path=path)))
        got = guarded(f"decode {path} T={tokens} k={k}", lambda: (
            timeit(jax.jit(op), [args]), benchlib.rel_err(jax.jit(op)(*args), want))
        ) or (None, None)
        chosen = expert_ops.choose_path(tokens, k, N)
        record(dict(what="expert-decode", path=path, tokens=tokens, hidden=D, experts=N, k=k,
                    fwd_ms=got[0], rel_err=got[1], chosen=chosen),
               f"decode {path:6s} T={tokens} k={k} (auto: {chosen}) err {fmt(got[1], '.1e')}")


# --crossover-parts: name -> part (the help text and the check read the names from here)
CROSSOVER_PARTS = dict(experts=_crossover_experts, router=_crossover_router,
                       decode=_crossover_decode)

# (n per axis, k) cases and ThresholdConfig fields swept by --router-configs.
ROUTER_CONFIG_TOKENS = 4096
ROUTER_CONFIG_CASES = ((320, 512), (320, 4096), (1024, 64), (1024, 512))
THRESHOLD_GRID = ((1, 0), (1, 1), (1, 2), (1, 4), (2, 1), (2, 4))  # (block_t, num_warps)
EMIT_GRID = ((1, 256, 4), (1, 256, 2), (1, 1024, 8), (2, 1024, 4))  # (block_t, slots, warps)


def router_configs(args, device, tag):
  """Router stages (gates with BatchNorm and log-softmax, column sort, threshold kernel,
  whole unsorted top-k) and the threshold / emit launch parameters, each checked against
  the default config's output; writes router-configs-<device>.json."""
  from omnimoe.pallas import router_threshold as rt
  keys = key_iter(args.seed + 2)
  rows = []

  def record(label, ms, **fields):
    rows.append(dict(fields, device=device, tokens=ROUTER_CONFIG_TOKENS, ms=ms))
    say(f"{label:64s} {fmt(ms, '8.4f')}")
    with open(os.path.join(args.out, f"router-configs-{tag}.json"), "w") as f:
      json.dump(rows, f, indent=1)

  say(f"\n== router stages and launch parameters, T={ROUTER_CONFIG_TOKENS} (ms, unrolled)")
  for n_axis, k in ROUTER_CONFIG_CASES:
    p = {"rx": scaled_normal(next(keys), (D, n_axis), D),
         "ry": scaled_normal(next(keys), (D, n_axis), D)}
    xs = [(benchlib.tokens_in(next(keys), ROUTER_CONFIG_TOKENS, D),) for _ in range(3)]
    sets = [router_log_probs(p, *x) for x in xs]
    gates = lambda x: router_log_probs(p, x)
    record(f"n={n_axis} gates + BatchNorm + log-softmax", timeit_unrolled(gates, xs),
           stage="gates", n=n_axis, k=k)
    record(f"n={n_axis} column sort", timeit_unrolled(lambda lx, ly: rt._sort_columns(ly), sets),
           stage="sort", n=n_axis, k=k)
    stages = {"threshold": rt.threshold,  # includes the column sort
              "topk": functools.partial(rt.cartesian_topk, sorted=False)}
    want = {stage: fn(*sets[0], k) for stage, fn in stages.items()}
    grid = [("threshold", dict(block_t=b, num_warps=w)) for b, w in THRESHOLD_GRID]
    grid += [("topk", dict(emit_block_t=b, emit_slots=sl, emit_num_warps=w))
             for b, sl, w in EMIT_GRID]
    for stage, fields in grid:
      config = dataclasses.replace(rt.ThresholdConfig(), **fields)
      fn = lambda lx, ly, op=stages[stage], c=config: op(lx, ly, k, config=c)
      same = all(bool(jnp.array_equal(a, b)) for a, b in zip(fn(*sets[0]), want[stage]))
      ms = guarded(f"router config {fields}", lambda: timeit_unrolled(fn, sets))
      record(f"n={n_axis} k={k} {stage} {fields}{'' if same else ' DIFFERS'}", ms,
             stage=stage, n=n_axis, k=k, same=same, **fields)


def cases(selected, token_counts=TOKENS, ks=KS, peer_ks=PEER_K_HEAD):
  """(model, what, impl, tokens, k, with backward) in run order."""
  out = []
  for tokens in token_counts:
    for k in ks:
      for impl in ("pallas", "xla"):
        out.append(("omnimoe", "router", impl, tokens, k, False))
      for impl in ("pallas", "xla-dense", "xla-gather"):
        out.append(("omnimoe", "ffn", impl, tokens, k, impl != "xla-gather"))
    for kh in peer_ks:
      for impl in ("pallas", "xla-gather"):
        out.append(("peer", "ffn", impl, tokens, kh, False))
  return [c for c in out if not selected or any(s in " ".join(map(str, c[:3])) for s in selected)]


def main_run(args):
  """Runs the sweep (or --crossover / --router-configs); returns the labels of the
  sweep's cases that failed their check or raised (empty: all good)."""
  device = jax.devices()[0].device_kind
  tag = benchlib.device_tag(device)
  say(benchlib.run_header())
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"headline-{tag}.json")

  def write_log():
    with open(os.path.join(args.out, f"headline-{tag}-log.txt"), "w") as f:
      f.write("\n".join(benchlib.LOG) + "\n")

  if args.crossover:
    crossover(args, device, tag)
    return []
  if args.router_configs:
    router_configs(args, device, tag)
    return []
  params = {}
  inputs = {}  # (model, tokens) -> the inputs of every impl and k of that case
  rows = []
  failed = []
  notes = {"does not fit": "  (does not fit: not run)", "check failed": "  FAILED check: not timed",
           "error": "  FAILED: raised"}
  say(f"\n== N={N} d={D} F={F} bf16 (ms; peak GiB of the fwd / fwd+bwd programs; "
      f"pallas FFN checked against plain XLA for T <= {CHECK_MAX_TOKENS}, tolerance "
      f"{REL_TOL:.0e})")
  for model, what, impl, tokens, k, bwd in cases(args.only, args.tokens, args.k, args.peer_k):
    if model not in params:
      params[model] = model_params(args.seed, model)
    if (model, tokens) not in inputs:
      inputs = {key: v for key, v in inputs.items() if key[1] == tokens}  # drop old T
      inputs[model, tokens] = case_inputs(args.seed, model, tokens)
    active_k = k * PEER_HEADS if model == "peer" else k
    label = f"{model} {what} {impl} T={tokens} k={active_k}"
    res = guarded(label, lambda: run_case(model, what, impl, tokens, k, params[model],
                                          inputs[model, tokens], bwd))
    if res is None:
      res = unmeasured("error")
    rows.append(dict(model=model, impl=impl, what=what, device=device, tokens=tokens,
                     hidden=D, experts=N, k=active_k, **res))
    if res["status"] in ("check failed", "error"):
      failed.append(f"{label}: {res['status']}" + (
          f" (relative error {res['rel_err']:.1e} vs {res['rel_err_vs']})"
          if res["rel_err"] is not None else ""))
    say(f"{label:46s} fwd {fmt(res['fwd_ms'], '8.3f')}  "
        f"fwd+bwd {fmt(res['fwd_bwd_ms'], '8.3f')}  peak {fmt(res['peak_gib'], '6.2f')} / "
        f"{fmt(res['fwd_bwd_peak_gib'], '6.2f')}{notes.get(res['status'], '')}")
    with open(path, "w") as f:
      json.dump(rows, f, indent=1)
    write_log()
  summary(rows)
  if failed:
    say(f"\nFAILED: {len(failed)} of {len(rows)} cases (no times recorded for them):")
    for line in failed:
      say(f"  {line}")
  write_log()
  return failed


def summary(rows):
  """The targets of the headline regime, from the rows of one run (T = 4096, k = 4096)."""
  get = lambda **kw: next((r for r in rows if all(r[a] == b for a, b in kw.items())), None)
  ours = get(model="omnimoe", what="ffn", impl="pallas", tokens=4096, k=4096)
  router = get(model="omnimoe", what="router", impl="pallas", tokens=4096, k=4096)
  dense = get(model="omnimoe", what="ffn", impl="xla-dense", tokens=4096, k=4096)
  peer = [r for r in rows if r["model"] == "peer" and r["impl"] == "xla-gather"
          and r["tokens"] == 4096 and r["fwd_ms"]]
  say("\n== headline (T=4096, k=4096, N=102400)")
  if ours and ours["fwd_ms"]:
    say(f"omnimoe ffn fwd {ours['fwd_ms']:.3f} ms (target <= 2.0); fwd+bwd "
        f"{ours['fwd_bwd_ms']} ms (target <= 3x fwd)")
    if dense and dense["fwd_ms"]:
      say(f"  vs xla-dense {dense['fwd_ms']:.3f} ms: {dense['fwd_ms'] / ours['fwd_ms']:.1f}x")
    for r in peer:
      say(f"  vs peer xla-gather k={r['k']}: {r['fwd_ms']:.3f} ms, "
          f"{r['fwd_ms'] / ours['fwd_ms']:.1f}x (target >= 10x)")
  if router and router["fwd_ms"]:
    say(f"router fwd {router['fwd_ms']:.3f} ms (target <= 0.3)")
  checked = [r for r in rows if r.get("rel_err") is not None]
  bad = [r for r in checked if check_failed(r["rel_err"])]
  say(f"pallas FFN outputs checked against plain XLA: {len(checked)}, FAILED: {len(bad)} "
      f"(tolerance {REL_TOL:.0e})")
  ours_ffn = [r for r in rows if r["impl"] == "pallas" and r["what"] == "ffn"
              and r["model"] == "omnimoe" and r["fwd_ms"]]
  pairs = [(r, d) for r in ours_ffn
           if (d := get(model="omnimoe", what="ffn", impl="xla-dense", tokens=r["tokens"],
                        k=r["k"])) and d["fwd_ms"]]
  slower = [r for r, d in pairs if d["fwd_ms"] < r["fwd_ms"]]
  unpaired = len(ours_ffn) - len(pairs)
  say(f"pallas cases slower than xla-dense: {len(slower)} of {len(pairs)} compared pairs"
      + (f" ({unpaired} timed pallas case(s) without a timed xla-dense partner, "
         "not compared)" if unpaired else ""))
  for r in slower:
    say(f"  slower: T={r['tokens']} k={r['k']}")


def plot(path):
  """Latency against active parameters (T = 4096) and against tokens (largest k)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(path) as f:
    rows = [r for r in json.load(f) if r["what"] == "ffn" and r["fwd_ms"]]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  for model, impl in sorted({(r["model"], r["impl"]) for r in rows}):
    mine = [r for r in rows if r["model"] == model and r["impl"] == impl]
    by_k = sorted((r["k"] * 2 * D / 1e6, r["fwd_ms"]) for r in mine if r["tokens"] == 4096)
    kmax = max(r["k"] for r in mine)
    by_t = sorted((r["tokens"], r["fwd_ms"]) for r in mine if r["k"] == kmax)
    label = f"{model} {impl}"
    if by_k:
      a1.plot(*zip(*by_k), marker="o", label=label)
    if by_t:
      a2.plot(*zip(*by_t), marker="o", label=f"{label} (k={kmax})")
  a1.set(xlabel="active expert parameters per token (M)", ylabel="FFN forward (ms)",
         yscale="log", title="T = 4096 tokens")
  a2.set(xlabel="tokens", ylabel="FFN forward (ms)", xscale="log", yscale="log",
         title="largest k")
  for a in (a1, a2):
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
  fig.suptitle(f"N = {N}, d = {D}, shared MLP {F} (bf16, {rows[0]['device']})")
  fig.tight_layout()
  out = path.replace(".json", ".png")
  fig.savefig(out, dpi=120)
  print(out)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", nargs="*", default=[],
                      help="only cases whose 'model what impl' contains one of these")
  parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
  parser.add_argument("--k", type=int, nargs="*", default=KS, help="OmniMoE k values")
  parser.add_argument("--peer-k", type=int, nargs="*", default=PEER_K_HEAD,
                      help=f"PEER k per head ({PEER_HEADS} heads)")
  parser.add_argument("--crossover", action="store_true",
                      help="instead of the sweep, time the competing expert-op paths and "
                      "router kernels where the dispatch rules switch")
  parser.add_argument("--crossover-parts", default=",".join(CROSSOVER_PARTS),
                      help="with --crossover: comma-separated subset of "
                      + ",".join(CROSSOVER_PARTS))
  parser.add_argument("--router-configs", action="store_true",
                      help="instead of the sweep, time the router's stages and its "
                      "threshold-search launch parameters")
  parser.add_argument("--plot", help="draw the figure from this JSON instead of running")
  args = parser.parse_args()
  if args.plot:
    plot(args.plot)
  elif main_run(args):
    sys.exit(1)  # the rows and the log are written; the failures are listed above


if __name__ == "__main__":
  main()
