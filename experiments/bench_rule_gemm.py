"""The rule path's forward grid A two ways: cuBLAS S + the forward grid pass, and one
fused Mosaic GPU GEMM (`omnimoe.pallas.rule_gemm`), with launch variants.

  PYTHONPATH=. python3 experiments/bench_rule_gemm.py [--out DIR]      # on the GPU

Cases: T = 4096, d = 1024, bf16, random log-softmax gates, the exact rule from the
threshold router; n = 320 (N = 102,400, the headline) at k = 4096 and 1024, n = 256 at
k = 2048. Each fused launch's A is checked against the two-step A (max |diff| / max |A|,
and the routed sets equal). Times are device-busy ms a call (profiler), host-timed
medians beside them. Prints a table last and writes rule-gemm-<device>.json (rows: case,
variant, device_ms, host_ms, rel_err, routed_mismatch).
"""
import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from experiments import benchlib
from experiments.benchlib import say
from omnimoe.pallas import common, expert_rule, router_threshold, rule_gemm
from omnimoe.pallas.expert_dense import grid_dot

CASES = ((320, 4096), (320, 1024), (256, 2048))  # (n, k); N = n^2
D = 1024
DEFAULT = rule_gemm.RuleGemmConfig()
LAUNCHES = (  # beside the default, at the headline only (v25b: the other tile order and
    # bands of 2-8 tiles were slower, 3.07 and 1.96-2.01 against 1.94 ms; v25: 4 stages
    # exceed shared memory, tile_m = 64 took 2.23 ms)
    dataclasses.replace(DEFAULT, stages=2), dataclasses.replace(DEFAULT, approx_math=False),
    dataclasses.replace(DEFAULT, stages=2, epi_m=128))


def inputs(seed, tokens, n, d, k):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (tokens, d), jnp.bfloat16)
  up = (jax.random.normal(ks[1], (n * n, d)) / d ** 0.5).astype(jnp.bfloat16)
  lx, ly = (jax.nn.log_softmax(jax.random.normal(key, (tokens, n))) for key in ks[2:])
  theta, cut = jax.jit(lambda a, b: router_threshold.threshold(a, b, k))(lx, ly)
  return x, up, lx, ly, theta, cut


def device_ms(fn, args, calls=5):
  return benchlib.busy_ms(benchlib.trace_calls(fn, [args], calls)) / calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  say(benchlib.run_header())
  device = jax.devices()[0].device_kind
  rows = []
  for n, k in CASES:
    case = f"T={args.tokens} n={n} k={k}"
    operands = inputs(args.seed, args.tokens, n, D, k)
    plan = expert_rule._Plan("silu", args.tokens, True, expert_rule.RuleConfig(),
                             common.resolve_interpret(None))
    gemm = jax.jit(lambda x, up: grid_dot(x, up.T, jnp.bfloat16))
    two_step = jax.jit(lambda x, up, *rule: expert_rule._forward_grid(
        grid_dot(x, up.T, jnp.bfloat16), jnp.int32(0), *rule, plan))
    want = two_step(*operands).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(want)))
    variants = [("cuBLAS S alone", gemm, operands[:2]), ("cuBLAS S + grid pass", two_step,
                                                         operands)]
    for config in (DEFAULT, *(LAUNCHES if (n, k) == CASES[0] else ())):
      fused = jax.jit(lambda *a, config=config: rule_gemm.rule_gemm(*a, config=config))
      label = "fused" if config == DEFAULT else "fused " + ", ".join(
          f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
          if getattr(config, f.name) != getattr(DEFAULT, f.name))
      variants.append((label, fused, operands))
    for label, fn, fn_args in variants:
      def measure(fn=fn, fn_args=fn_args, label=label):
        row = dict(case=case, variant=label, device_ms=device_ms(fn, fn_args),
                   host_ms=benchlib.timeit(fn, [fn_args]), rel_err=None, routed_mismatch=None)
        if label.startswith("fused"):
          got = fn(*fn_args).astype(jnp.float32)
          row["rel_err"] = float(jnp.max(jnp.abs(got - want))) / scale
          row["routed_mismatch"] = int(jnp.sum((got != 0) != (want != 0)))
        return row
      row = benchlib.guarded(f"{case} {label}", measure)
      if row is not None:
        rows.append(row)
        say(f"{case} {label}: {row['device_ms']:.3f} ms device, {row['host_ms']:.3f} host"
            + (f", err {row['rel_err']:.1e}, routed mismatch {row['routed_mismatch']}"
               if row["rel_err"] is not None else ""))
  say(f"\nd = {D}, bf16 ({device}): ms a call")
  say("| case | variant | device | host | max err / max | routed mismatch |")
  say("| --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
    mism = "-" if r["routed_mismatch"] is None else r["routed_mismatch"]
    say(f"| {r['case']} | {r['variant']} | {r['device_ms']:.3f} | {r['host_ms']:.3f} | {err} "
        f"| {mism} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"rule-gemm-{benchlib.device_tag(device)}.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
