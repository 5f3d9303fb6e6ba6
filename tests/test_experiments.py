"""Experiment scripts that run in seconds on the CPU do so, and print what they promise."""
import json
import subprocess
import sys

import pytest

from experiments import benchlib
from omnimoe.pallas import expert_rule
from tests.conftest import REPO, SUBPROCESS_ENV


def test_train_step_breakdown_times_each_kind(tmp_path):
  env = dict(SUBPROCESS_ENV, PYTHONPATH=REPO, OUT=str(tmp_path))
  proc = subprocess.run(
      [sys.executable, "experiments/train_step_breakdown.py", "--config", "configs/tiny.py",
       "--kinds", "omnimoe,dense", "--config.train.batch_size=2", "--profile", "5",
       "--inputs", "data"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=True)
  rows = json.loads((tmp_path / "train-step-breakdown.json").read_text())["rows"]
  assert set(rows) == {"omnimoe", "dense"}
  for r in rows.values():
    assert r["step"] > 0 and r["forward"] > 0 and r["optimizer"] > 0
    # timed separately: the step (forward, backward, update) costs more than either part
    assert r["step"] > r["forward"] and r["step"] > r["optimizer"]
    assert isinstance(r["kernels"], list)  # device kernels: none on the CPU backend
  assert "| omnimoe |" in proc.stdout and "| dense |" in proc.stdout
  ratio = rows["omnimoe"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
  assert f"omnimoe / dense tokens/s: {ratio:.3f}x (target >= 0.85x: " in proc.stdout
  for kind in rows:  # the compiled step, to look the profiled kernels up in
    assert "ENTRY" in (tmp_path / f"train-step-{kind}.hlo.txt").read_text()


def test_trace_busy_time_and_kernel_table():
  """Overlapping kernels count once in the busy time; the table sums per name, per call."""
  events = [("gemm", 0, 4_000_000, "dot.1"), ("copy", 3_000_000, 5_000_000, "copy.2"),
            ("gemm", 9_000_000, 10_000_000, "dot.1"), ("copy", 9_500_000, 9_600_000, "c.3")]
  assert benchlib.busy_ms(events) == 6.0  # [0, 5] and [9, 10] ms
  table = benchlib.kernel_table(events, calls=2)
  assert [(k["kernel"], k["ms_per_call"], k["launches_per_call"], k["hlo_op"])
          for k in table] == [("gemm", 2.5, 1.0, "dot.1"), ("copy", 1.05, 1.0, "copy.2")]


def test_topk_exactness_counts_a_rounding_tie():
  """experiments/topk_exactness.py's fast full-grid top-k (a partition first, where the
  tests' brute force sorts every row) returns the brute force's ids, so it sees the
  product-key search's one caveat (a rounding tie from outside the candidates) and agrees
  with the search elsewhere."""
  import jax.numpy as jnp
  import numpy as np

  from experiments import topk_exactness
  from omnimoe import reference
  from tests import brute_force as bf
  rng = np.random.default_rng(5)  # the rounding-tie input of tests/test_pallas_router.py
  tie_input = bf.rounding_ties(rng, 4, 7, 7)
  plain_input = (np.log(rng.dirichlet(np.ones(9), 5)), np.log(rng.dirichlet(np.ones(8), 5)))
  for (lx, ly), same in [(tie_input, False), (plain_input, True)]:
    lx, ly = lx.astype(np.float32), ly.astype(np.float32)
    sums = (lx[:, :, None] + ly[:, None, :]).reshape(len(lx), -1)
    got = topk_exactness.full_grid_topk(sums, 3)
    np.testing.assert_array_equal(got, bf.full_topk(lx, ly, 3)[1])
    ids = np.asarray(reference.cartesian_topk(jnp.asarray(lx), jnp.asarray(ly), 3)[1])
    assert np.array_equal(got, ids) == same


def test_bench_kernels_module_part_times_every_row(monkeypatch):
  """`bench_kernels.py --parts module` at toy sizes: the Flax layer (float32 and bf16
  parameters) and the layer function each get a forward and a fwd+bwd time (a failing row
  would be None: the part keeps going past errors)."""
  from experiments import bench_kernels
  monkeypatch.setattr(bench_kernels, "T", 40)
  monkeypatch.setattr(bench_kernels, "D", 24)
  monkeypatch.setattr(bench_kernels, "F", 40)
  monkeypatch.setattr(bench_kernels, "MODULE_CASES", [(64, 4)])
  rows = bench_kernels.part_module(0)
  assert len(rows) == 4
  for label, row in rows.items():
    assert row is not None and all(ms > 0 for ms in row), label


def test_train_throughput_medians_skip_the_first_timed_interval_only_when_others_exist():
  from experiments import train_throughput
  untimed, first, later = {"step": 1}, {"step": 10, "tokens_per_s": 1.0}, {"step": 20,
                                                                          "tokens_per_s": 2.0}
  assert train_throughput.timed_intervals([untimed, first, later]) == [later]
  assert train_throughput.timed_intervals([first]) == [first]  # --steps = --log_every
  with pytest.raises(SystemExit, match="no timed training interval"):
    train_throughput.timed_intervals([untimed])


def test_bench_kernels_stages_part_times_every_stage(monkeypatch):
  """`bench_kernels.py --parts stages` (in the default parts) at toy sizes: every stage
  runs and gets a time."""
  import jax

  from experiments import bench_kernels
  for name, value in dict(T=16, D=32, F=64, STAGE_CASES=[(64, 4)]).items():
    monkeypatch.setattr(bench_kernels, name, value)
  run_once = lambda f, args, **kw: [jax.block_until_ready(f(*args[0])), 1.0][1]
  monkeypatch.setattr(bench_kernels, "timeit", run_once)
  monkeypatch.setattr(bench_kernels, "timeit_unrolled", run_once)
  (stages,) = bench_kernels.part_stages(0).values()
  assert {"router kernel", "fwd kernel", "bwd token kernel", "table grads (incl. bucketing)",
          "mlp fwd", "mlp fwd+bwd", "gates fwd"} <= set(stages)
  assert all(ms == 1.0 for ms in stages.values())


def test_bench_kernels_variants_part_runs_both_pair_score_schedules(monkeypatch):
  """`bench_kernels.py --parts variants` at toy sizes (N = 1024, k = 4: the token path):
  the expert op under each variant is timed and within bf16 error of the float32
  reference in y and all four gradients, and the layer row of each variant is timed."""
  import jax

  from experiments import bench_kernels
  variants = bench_kernels.EXPERT_VARIANTS[65536, 32]
  for name, value in dict(T=16, D=32, F=64, DEVICE_CALLS=1,
                          EXPERT_VARIANTS={(1024, 4): variants},
                          LAYER_VARIANTS=[(1024, 4, "pallas", v) for v in variants]).items():
    monkeypatch.setattr(bench_kernels, name, value)
  monkeypatch.setattr(bench_kernels, "timeit",
                      lambda f, args, **kw: [jax.block_until_ready(f(*args[0])), 1.0][1])
  out = bench_kernels.part_variants(0, lambda rows: None)
  assert len(out) == 2 * len(variants) and "pair scores in buckets" in variants
  for label, row in out.items():
    assert row is not None, label
    times, errs = row if label.startswith("expert") else (row, [])
    assert times["fwd_ms"] > 0 and times["fwd_bwd_ms"] > 0, label
    assert len(errs) == (5 if label.startswith("expert") else 0)
    assert all(err < 2e-2 for err in errs), (label, errs)


def test_bench_kernels_table_gives_both_impls_the_same_inputs(monkeypatch, tmp_path):
  """The table part at toy sizes: every (what, N, k) row timed for both impls (each timing
  one call) and written to the JSON; both impls of a case draw their inputs from the same
  keys, other cases from others."""
  import itertools

  import jax
  import numpy as np

  from experiments import bench_kernels
  for name, value in dict(T=16, D=32, F=64, CASES=[(64, 4), (36, 3)], DEVICE_CALLS=1).items():
    monkeypatch.setattr(bench_kernels, name, value)
  monkeypatch.setattr(bench_kernels, "timeit",
                      lambda f, args, **kw: [jax.block_until_ready(f(*args[0])), 1.0][1])
  first_keys = {}
  time_case = bench_kernels.time_case

  def recording(what, impl, n, k, keys, profile=0):
    first = next(keys)
    first_keys[what, impl, n, k] = np.asarray(jax.random.key_data(first))
    return time_case(what, impl, n, k, itertools.chain([first], keys), profile)
  monkeypatch.setattr(bench_kernels, "time_case", recording)
  rows = bench_kernels.part_table(0, None, "cpu", str(tmp_path / "t.json"), profile=3)
  assert len(rows) == 12 and all(r["fwd_ms"] == 1.0 for r in rows)
  # The CPU has no device planes: device time 0, kernel lists empty (but present).
  assert all(r["fwd_device_ms"] == 0.0 for r in rows)
  assert all((r["fwd_bwd_ms"] is None) == (r["what"] == "router") for r in rows)
  assert all(("fwd_kernels" in r) == ((r["what"], r["impl"]) == ("layer", "pallas"))
             for r in rows)
  only = bench_kernels.part_table(0, None, "cpu", str(tmp_path / "o.json"), only={"expert:36:3"})
  assert [(r["what"], r["impl"], r["experts"]) for r in only] == [("expert", "pallas", 36),
                                                                 ("expert", "xla", 36)]
  assert json.loads((tmp_path / "t.json").read_text()) == rows
  cases = {(what, n, k) for what, _, n, k in first_keys}
  assert len(cases) == 6
  for what, n, k in cases:
    np.testing.assert_array_equal(first_keys[what, "pallas", n, k], first_keys[what, "xla", n, k])
  assert len({first_keys[what, "xla", n, k].tobytes() for what, n, k in cases}) == 6


def test_bench_kernels_target_lines_judge_one_run():
  """Issue "Pallas kernels"' targets from table rows: bounds in both directions, a bound met
  exactly, ratios between rows of the same run, and targets whose rows are missing."""
  from experiments import bench_kernels

  def row(what, impl, n, fwd, fwd_bwd=None):
    return dict(what=what, impl=impl, experts=n, k=32, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                fwd_device_ms=fwd and fwd * 0.9, fwd_bwd_device_ms=fwd_bwd and fwd_bwd * 0.9)
  rows = [row("router", "pallas", 2 ** 20, 0.25), row("expert", "pallas", 65536, 0.35, 1.3),
          row("layer", "pallas", 65536, 0.3, 1.0), row("layer", "xla", 65536, 0.6, 3.5),
          row("layer", "pallas", 2 ** 20, 0.36, None), row("layer", "pallas", 4096, 0.1, 0.1)]
  lines = bench_kernels.target_lines(rows)[1:]
  verdicts = [line.split(":")[0].strip() + " -> " + line.split()[-1] for line in lines]
  assert verdicts == [
      "router N=2^20 fwd <= 0.2 ms -> MISSED", "expert N=65536 fwd <= 0.35 ms -> met",
      "expert N=65536 fwd_bwd <= 1.2 ms -> MISSED", "layer N=65536 fwd <= 0.33 ms -> met",
      "layer N=65536 fwd_bwd <= 1.1 ms -> met",
      "layer N=65536 fwd, plain XLA / pallas >= 3x -> MISSED",  # 2x
      "layer N=2^20 / N=65536 fwd <= 1.25x -> met",  # 1.2x
      "layer N=65536 fwd_bwd, plain XLA / pallas >= 3x -> met",  # 3.5x
      "layer N=2^20 / N=65536 fwd_bwd -> run"]  # "not timed in this run"
  assert "2.000x (2.000x device)" in lines[5] and "0.250 ms (0.225 ms device)" in lines[0]


def _tiny_headline(monkeypatch):
  """bench_headline at toy sizes on the CPU (the Pallas kernels in interpret mode), every
  timing replaced by one call; returns the module and the (p, x) pairs each forward
  timing was given."""
  import argparse

  from experiments import bench_headline as bh
  for name, value in dict(N_AXIS=8, N=64, D=32, F=32, PEER_HEADS=2, PEER_KEY_DIM=16).items():
    monkeypatch.setattr(bh, name, value)
  timed = []

  def fake_timeit(fn, arg_sets):
    timed.append(arg_sets)
    fn(*arg_sets[0])
    return 1.0
  monkeypatch.setattr(bh, "timeit", fake_timeit)
  args = lambda out, *only: argparse.Namespace(
      out=str(out), seed=0, only=list(only), tokens=[16], k=[4], peer_k=[2],
      crossover=False, router_configs=False)
  return bh, timed, args


def test_bench_headline_checks_and_shares_inputs(monkeypatch, tmp_path):
  """Every impl of a case is timed on the same tokens; the pallas FFN rows carry their
  relative error against plain XLA (under the bf16 tolerance), the others null."""
  import numpy as np
  bh, timed, args = _tiny_headline(monkeypatch)
  assert bh.main_run(args(tmp_path)) == []
  rows = json.loads(next(tmp_path.glob("headline-*.json")).read_text())
  assert len(rows) == len(bh.cases([], [16], [4], [2])) == 7
  for r in rows:
    assert {"model", "impl", "what", "device", "tokens", "hidden", "experts", "k", "fwd_ms",
            "fwd_bwd_ms", "peak_gib", "rel_err"} <= set(r)
    assert r["status"] == "timed" and r["fwd_ms"] == 1.0
    if r["impl"].startswith("pallas") and r["what"] == "ffn":
      assert r["rel_err"] <= bh.REL_TOL
      assert r["rel_err_vs"] == ("xla-dense" if r["model"] == "omnimoe" else "xla-gather")
    else:
      assert r["rel_err"] is None
  forwards = [s for s in timed if isinstance(s[0][0], dict)]  # (p, x) sets, not (cot, ..)
  by_model = {}
  for sets in forwards:
    by_model.setdefault("w_gate_up" in sets[0][0], []).append([np.asarray(x) for _, x in sets])
  assert sorted(map(len, by_model.values())) == [2, 5]  # peer: 2 impls; omnimoe: 2 + 3
  for same in by_model.values():  # every impl and what of a model: one pair of token sets
    for xs in same[1:]:
      assert all(np.array_equal(a, b) for a, b in zip(xs, same[0]))
  log = "\n".join(bh.benchlib.LOG)
  assert "pallas cases slower than xla-dense: 0 of 1 compared pairs" in log
  bh.summary([r for r in rows if r["impl"] != "xla-dense"])
  assert bh.benchlib.LOG[-1].startswith("pallas cases slower than xla-dense: 0 of 0 compared "
                                        "pairs (1 timed pallas case(s) without")


def test_bench_headline_fails_on_a_wrong_kernel(monkeypatch, tmp_path):
  """A pallas FFN whose output is off is recorded with its error, not timed, and the run
  exits non-zero after writing every row."""
  import sys

  import pytest
  bh, _, _ = _tiny_headline(monkeypatch)
  right = bh.experts
  monkeypatch.setattr(bh, "experts", lambda x, p, w, i, impl, *a, **kw: right(
      x, p, w, i, impl, *a, **kw) * (1.5 if impl == "pallas" else 1))
  monkeypatch.setattr(sys, "argv", ["bench_headline.py", "--out", str(tmp_path), "--tokens",
                                    "16", "--k", "4", "--only", "omnimoe ffn"])
  with pytest.raises(SystemExit) as exit_info:
    bh.main()
  assert exit_info.value.code == 1
  rows = json.loads(next(tmp_path.glob("headline-*.json")).read_text())
  assert [r["impl"] for r in rows] == ["pallas", "xla-dense", "xla-gather"]
  bad = rows[0]
  assert bad["status"] == "check failed" and bad["rel_err"] > bh.REL_TOL
  assert bad["fwd_ms"] is None and bad["fwd_bwd_ms"] is None
  assert all(r["status"] == "timed" for r in rows[1:])
  log = next(tmp_path.glob("headline-*-log.txt")).read_text()
  assert "FAILED: 1 of 3 cases" in log and "check FAILED" in log


def test_bench_headline_decode_crossover_times_every_path(monkeypatch, tmp_path):
  """`--crossover --crossover-parts decode` at toy sizes: few tokens at large k, each path
  (token kernels, dense GEMMs, plain XLA) timed and checked against the XLA gather."""
  bh, timed, args = _tiny_headline(monkeypatch)
  monkeypatch.setattr(bh, "CROSSOVER_DECODE", ((1, 3), (8, 40)))
  namespace = args(tmp_path)
  namespace.crossover_parts = "decode"
  bh.crossover(namespace, "cpu", "cpu")
  rows = json.loads((tmp_path / "crossover-cpu.json").read_text())
  assert [(r["path"], r["tokens"], r["k"]) for r in rows] == [
      (path, tokens, k) for k in (8, 40) for tokens in (1, 3)
      for path in ("tokens", "dense", "xla")]
  assert all(r["fwd_ms"] == 1.0 and r["rel_err"] < 1e-2 for r in rows), rows
  namespace.crossover_parts = "decode,experts,routers"
  with pytest.raises(ValueError, match=r"unknown \['routers'\]"):
    bh.crossover(namespace, "cpu", "cpu")


def test_tile_occupancy_counts_tiles_with_a_routed_pair():
  """experiments/tile_occupancy.py: its mask is each token's exact top-k of the product
  grid, and a tile counts once it holds one routed pair."""
  import numpy as np

  from experiments import tile_occupancy as occ
  rng = np.random.default_rng(3)
  lx, ly = (occ.log_softmax(rng.normal(size=(6, s))).astype(np.float32) for s in (4, 6))
  mask = occ.routed_mask(lx, ly, 5, chunk=4)  # two chunks, the second partial
  sums = (lx[:, :, None] + ly[:, None, :]).reshape(6, -1)
  want = np.zeros_like(sums, bool)
  np.put_along_axis(want, np.argsort(-sums, axis=1)[:, :5], True, axis=1)
  np.testing.assert_array_equal(mask.reshape(6, -1), want)

  grid = np.zeros((4, 2, 4), bool)
  grid[0, 0, 0] = grid[3, 1, 3] = True  # tiles (tokens 0-1, row 0, cols 0-1), (2-3, 1, 2-3)
  assert occ.occupancy(grid, 2, 1, 2) == 2 / 8
  assert occ.occupancy(grid, 4, 2, 4) == 1.0
  with pytest.raises(ValueError, match="does not divide"):
    occ.occupancy(grid, 3, 1, 2)
  assert occ.parse_tile("64x1x64") == (64, 1, 64)
  for bad in ("64x1", "64x0x8", "axbxc"):
    with pytest.raises(Exception, match="BxRxC"):
      occ.parse_tile(bad)


def test_bench_rule_times_every_variant_and_compares_gradients(monkeypatch, tmp_path):
  """experiments/bench_rule.py at toy sizes (interpret mode, each timing one call): every
  variant and both routers get a row, the rule variants' gradients match the pairs
  path's within bf16 tolerance, and the JSON holds what the table printed."""
  from experiments import bench_rule
  bh, _, _ = _tiny_headline(monkeypatch)
  monkeypatch.setattr(bench_rule, "timeit", lambda fn, arg_sets: (fn(*arg_sets[0]), 1.0)[1])
  monkeypatch.setattr(sys, "argv", ["bench_rule.py", "--tokens", "16", "--k", "8",
                                    "--out", str(tmp_path)])
  bench_rule.main()
  (path,) = tmp_path.glob("rule-*.json")
  rows = {r["variant"]: r for r in json.loads(path.read_text())}
  want = (["pairs", "rule kernel", "rule xla"]
          + [f"rule kernel {walk}" for walk in expert_rule.ROW_WALKS[1:]]
          + [f"rule kernel, forward grid by {g}" for g in expert_rule.FORWARD_GRIDS[1:]]
          + [f"rule kernel rows{b} w{w} s{s}" for b, w, s in bench_rule.LAUNCHES]
          + ["router pairs", "router rule"])
  assert list(rows) == want
  assert rows["pairs"]["grad_rel_err"] is None and rows["pairs"]["fwd_ms"] == 1.0
  for name in want[1:-2]:
    errs = rows[name]["grad_rel_err"]
    assert set(errs) == {*bench_rule.GRAD_NAMES, "x"}
    assert max(errs.values()) < 2e-2, (name, errs)
    assert rows[name]["fwd_ms"] == rows[name]["fwd_bwd_ms"] == 1.0
  assert rows["router rule"]["fwd_ms"] == 1.0


def test_bench_rule_gemm_checks_the_fused_grid(monkeypatch, tmp_path):
  """experiments/bench_rule_gemm.py at toy sizes (interpret mode, timings replaced): the
  two-step and fused rows, the fused A checked against the two-step one (routed sets
  equal, bf16 error), the JSON as printed."""
  from experiments import bench_rule_gemm as brg
  monkeypatch.setattr(brg, "CASES", ((64, 300),))
  monkeypatch.setattr(brg, "D", 64)
  monkeypatch.setattr(brg, "LAUNCHES", ())
  monkeypatch.setattr(brg, "device_ms", lambda fn, args: (fn(*args), 1.0)[1])
  monkeypatch.setattr(brg.benchlib, "timeit", lambda fn, arg_sets: 2.0)
  monkeypatch.setattr(sys, "argv", ["bench_rule_gemm.py", "--tokens", "100",
                                    "--out", str(tmp_path)])
  brg.main()
  (path,) = tmp_path.glob("rule-gemm-*.json")
  rows = json.loads(path.read_text())
  assert [r["variant"] for r in rows] == ["cuBLAS S alone", "cuBLAS S + grid pass", "fused"]
  fused = rows[-1]
  assert fused["routed_mismatch"] == 0 and 0 < fused["rel_err"] < 1e-2
  assert fused["device_ms"] == 1.0 and fused["host_ms"] == 2.0
