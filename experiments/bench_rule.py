"""The dense regime routed by the top-k's rule against the pairs path, at the headline.

  PYTHONPATH=. python3 experiments/bench_rule.py [--tokens 4096] [--k 4096] [--no-launches]
      [--out DIR]

The rule path (`expert_rule`, routed by (theta, cut), no pairs) is the model's path in the
dense regime for k in the thousands (`router.routes_by_rule`) because it wins the whole
FFN's forward and forward+backward here (kernels_notes.md v17, v19, v20). One GPU run, the
headline's shapes and inputs (`bench_headline`'s parameters, tokens and cotangent):
  - the FFN fwd and fwd+bwd on the pairs path (the model's: threshold router, emit,
    `expert_dense`), and on the rule path with its grid passes as Pallas kernels and as
    their XLA twins (`RuleConfig.grid_pass`), and with the kernels' other row walks
    (`RuleConfig.row_walk`), and with the forward alone's A from one fused GEMM
    (`RuleConfig.forward_grid`), each fwd+bwd's top kernels;
  - the grid kernels' launches (`LAUNCHES`: grid rows a loop step, warps, stages);
  - the two routers: pairs (threshold search + emit) and rule (threshold search only);
  - every rule variant's gradients against the pairs path's (relative errors, bf16).
Prints a table last and writes `rule-<device>.json` (a list of rows: variant, fwd_ms,
fwd_bwd_ms, grad_rel_err, kernels) under --out.
"""
import argparse
import json
import os

import jax

from experiments import bench_headline as bh
from experiments import benchlib
from experiments.benchlib import fwd_bwd, guarded, say, timeit
from omnimoe.pallas import expert_rule

# (block_rows, num_warps, num_stages) of the grid kernels, beside RuleConfig's default.
LAUNCHES = ((8, 4, 1), (8, 2, 1), (16, 2, 1), (16, 8, 1), (32, 4, 1), (16, 4, 2))
GRAD_NAMES = ("up", "down", "rx", "ry", "w_gate_up", "wd")


def rule_ffn(k: int, config: expert_rule.RuleConfig):
  """bench_headline's OmniMoE FFN with the routed branch on the rule path."""
  return lambda p, x: bh.omnimoe_ffn(p, x, k=k, impl="pallas", rule=True, rule_config=config)


def grad_errors(got, want) -> dict:
  """Relative error of each gradient (parameters and x) against the pairs path's."""
  (_, (gp, gx)), (_, (wp, wx)) = got, want
  errs = {name: benchlib.rel_err(gp[name], wp[name]) for name in GRAD_NAMES}
  return dict(errs, x=benchlib.rel_err(gx, wx))


def variants(k: int, launches=LAUNCHES):
  """(name, FFN, whether to list its kernels) in the order run."""
  yield "pairs", lambda p, x: bh.omnimoe_ffn(p, x, k=k, impl="pallas", rule=False), True
  for grid_pass in expert_rule.GRID_PASSES:
    yield (f"rule {grid_pass}",
           rule_ffn(k, expert_rule.RuleConfig(grid_pass=grid_pass)), True)
  for walk in expert_rule.ROW_WALKS[1:]:
    yield f"rule kernel {walk}", rule_ffn(k, expert_rule.RuleConfig(row_walk=walk)), True
  for grid in expert_rule.FORWARD_GRIDS[1:]:
    yield (f"rule kernel, forward grid by {grid}",
           rule_ffn(k, expert_rule.RuleConfig(forward_grid=grid)), False)
  for rows, nw, ns in launches:
    config = expert_rule.RuleConfig(block_rows=rows, num_warps=nw, num_stages=ns)
    yield f"rule kernel rows{rows} w{nw} s{ns}", rule_ffn(k, config), False


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--k", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--launches", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the grid kernels' launches (LAUNCHES)")
  args = parser.parse_args()
  say(benchlib.run_header())
  device = jax.devices()[0].device_kind
  p = bh.model_params(args.seed, "omnimoe")
  xs, cot = bh.case_inputs(args.seed, "omnimoe", args.tokens)
  rows, want = [], None
  for name, ffn, listed in variants(args.k, LAUNCHES if args.launches else ()):
    def measure():
      g = fwd_bwd(ffn, 2)
      row = dict(variant=name, fwd_ms=timeit(jax.jit(ffn), [(p, x) for x in xs]),
                 fwd_bwd_ms=timeit(g, [(cot, p, x) for x in xs]), grad_rel_err=None,
                 kernels=benchlib.kernel_times(lambda: g(cot, p, xs[0]), top=12)
                 if listed else [])
      return row, g(cot, p, xs[0])
    got = guarded(name, measure)
    if got is None:
      continue
    row, grads = got
    if want is None:
      want = grads
    else:
      row["grad_rel_err"] = grad_errors(grads, want)
    rows.append(row)
    say(f"{name}: fwd {bh.fmt(row['fwd_ms'], '.3f')} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
        + (f", max grad error vs pairs {max(row['grad_rel_err'].values()):.1e}"
           if row["grad_rel_err"] else ""))
    for kern in row["kernels"]:
      say(f"    {kern['ms_per_call']:.3f} ms  {kern['kernel'][:60]}  {kern['hlo_op']}")
  for name, rule in (("pairs", False), ("rule", True)):
    router = jax.jit(lambda p, x, rule=rule: bh.omnimoe_router(p, x, k=args.k, impl="pallas",
                                                               rule=rule))
    ms = guarded(f"router {name}", lambda: timeit(router, [(p, x) for x in xs]))
    rows.append(dict(variant=f"router {name}", fwd_ms=ms, fwd_bwd_ms=None,
                     grad_rel_err=None, kernels=[]))
  say(f"\nT = {args.tokens}, k = {args.k}, N = {bh.N}, d = {bh.D}, F = {bh.F}, bf16 "
      f"({device}): ms")
  say("| variant | fwd | fwd+bwd | max grad error vs pairs |")
  say("| --- | ---: | ---: | ---: |")
  for r in rows:
    err = max(r["grad_rel_err"].values()) if r["grad_rel_err"] else None
    say(f"| {r['variant']} | {bh.fmt(r['fwd_ms'], '.3f')} | {bh.fmt(r['fwd_bwd_ms'], '.3f')} "
        f"| {bh.fmt(err, '.1e')} |")
  os.makedirs(args.out, exist_ok=True)
  tag = benchlib.device_tag(device)
  with open(os.path.join(args.out, f"rule-{tag}.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
