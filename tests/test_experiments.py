"""Experiment scripts that run in seconds on the CPU do so, and print what they promise."""
import json
import subprocess
import sys

from experiments import benchlib
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
    assert abs(r["step"] - r["forward"] - r["optimizer"] - r["backward"]) < 1e-6
    assert isinstance(r["kernels"], list)  # device kernels: none on the CPU backend
  assert "| omnimoe |" in proc.stdout and "| dense |" in proc.stdout
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
