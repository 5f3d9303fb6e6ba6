"""launch.py end to end in subprocesses: training, exact resume after SIGKILL, SIGTERM save,
config errors, and sampling from the result."""
import json
import os
import random
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import sample
from tests.conftest import REPO, SUBPROCESS_ENV, launch_command, run_launch

STEPS = 200
RUN = (f"--config.train.steps={STEPS}", "--config.train.log_every=1",
       "--config.train.eval_every=50", "--config.checkpoint.every=10",
       "--config.checkpoint.keep=2")
TIMING = ("step_time_s", "tokens_per_s", "eta_s", "mfu")  # differ between runs by nature


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """An uninterrupted tiny run of STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("run_a"))
  proc = run_launch(workdir, *RUN)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc.stderr


def test_end_to_end_loss_falls(run_a):
  workdir, log = run_a
  train = [r for r in _records(workdir) if r["split"] == "train"]
  val = [r for r in _records(workdir) if r["split"] == "val"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  first, last = np.mean([r["loss"] for r in train[:10]]), np.mean([r["loss"] for r in train[-10:]])
  assert first > 5.0 and last < first - 1.5, (first, last)
  assert [r["step"] for r in val] == [50, 100, 150, 200] and val[-1]["loss"] < val[0]["loss"]
  assert 0 < train[-1]["experts_used"] <= 1 and train[-1]["router_entropy"] > 0
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert f"step {STEPS}/{STEPS} | loss" in log and "tok/s | MFU n/a | ETA" in log
  assert "orbax" not in log  # library chatter stays off the console


def _wait_until(proc, done, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if done():
      return True
    time.sleep(0.005)
  return False


def _latest_step(workdir):
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return 0
  records = _records(workdir)
  return records[-1]["step"] if records else 0


def test_sigkill_then_resume_is_bit_identical(run_a, tmp_path):
  workdir_a, _ = run_a
  workdir = str(tmp_path / "run_b")
  kill_after = random.randint(15, STEPS - 40)
  proc = subprocess.Popen(launch_command(workdir, *RUN), cwd=REPO, env=SUBPROCESS_ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, "checkpoints")
  saved = lambda: os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))
  reached = _wait_until(proc, lambda: saved() and _latest_step(workdir) >= kill_after)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert reached, f"run B ended before step {kill_after}"

  resumed = run_launch(workdir, *RUN)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "resumed from the checkpoint of step" in resumed.stderr, (kill_after, resumed.stderr)
  assert _without_timing(_records(workdir)) == _without_timing(_records(workdir_a)), kill_after
  _, step_a, _, variables_a = sample.load(workdir_a)
  _, step_b, _, variables_b = sample.load(workdir)
  assert step_a == step_b == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables_a),
               jax.device_get(variables_b))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      launch_command(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                     "--config.checkpoint.every=1000"),
      cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  assert _wait_until(proc, lambda: _latest_step(workdir) >= 20)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-4000:]
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(steps) == 1 and int(steps[0]) >= 20
  assert f"SIGTERM at step {steps[0]}: checkpoint saved, stopping" in err


def test_profile_window_writes_a_trace(tmp_path):
  proc = run_launch(str(tmp_path), "--config.train.steps=8", "--config.train.profile_start=3",
                    "--config.train.profile_steps=2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"profiler trace of steps 3-4 written to {tmp_path}/profile" in proc.stderr
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


@pytest.mark.parametrize("override,message", [
    ("--config.train.profile_steps=0", "train.profile_steps=0: must be >= 1"),
    ("--config.train.seq_len=1000", "train.seq_len=1000: must be <= model.max_len=64"),
    ("--config.data.path=/no/such/dir", "data.path='/no/such/dir': no such file or folder"),
])
def test_config_error_exits_with_the_field(tmp_path, override, message):
  proc = run_launch(str(tmp_path), "--config.data.source=text", override)
  assert proc.returncode == 1
  assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_sample_greedy_matches_uncached_decoding(run_a):
  workdir, _ = run_a
  _, _, model, variables = sample.load(workdir)
  prompt, n = np.frombuffer(b"def ", np.uint8).astype(np.int32), 12
  generate = lambda temperature, seed: np.asarray(sample.generate(
      model, variables, jnp.asarray(prompt), n, temperature, jax.random.key(seed)))
  greedy = generate(0.0, 0)
  np.testing.assert_array_equal(greedy, generate(0.0, 1))

  forward = jax.jit(lambda tokens: model.apply(variables, tokens, train=False)[0])
  tokens = np.zeros((1, prompt.size + n), np.int32)  # causal: padding after t is never seen
  tokens[0, :prompt.size] = prompt
  for t in range(prompt.size, prompt.size + n):  # greedy by full forward passes, no cache
    tokens[0, t] = int(jnp.argmax(forward(tokens)[0, t - 1]))
  np.testing.assert_array_equal(greedy, tokens[0, prompt.size:])

  np.testing.assert_array_equal(generate(1.0, 3), generate(1.0, 3))
  assert sample.sample_text(workdir, "def ", n, 0.0, 0) == bytes(greedy.astype(np.uint8)).decode(
      "utf-8", errors="replace")
