"""launch.py end to end in subprocesses: training, its console lines, metrics.jsonl and
TensorBoard files, keep-last-N, exact resume after SIGKILL, SIGTERM/SIGINT save, config
errors, and sampling from the result (in process and by `python -m omnimoe.sample`)."""
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import sample
from omnimoe.model import build_model
from tests.conftest import REPO, SUBPROCESS_ENV, launch_command, run_launch

STEPS = 200
RUN = (f"--config.train.steps={STEPS}", "--config.train.log_every=1",
       "--config.train.eval_every=50", "--config.checkpoint.every=10",
       "--config.checkpoint.keep=2")
TIMING = ("step_time_s", "tokens_per_s", "eta_s", "mfu")  # differ between runs by nature
# The console lines of metrics.format_train_line (peak mem: devices that count memory only)
# and of a validation.
TRAIN_LINE = re.compile(
    r"\bstep +(?P<step>\d+)/(?P<total>\d+) \| loss (?P<loss>\d+\.\d{4})"
    r" \| lr (?P<lr>\d\.\d{2}e[-+]\d{2}) \| (?P<ktok>\d+\.\d)k tok/s"
    r" \| MFU (?P<mfu>n/a|\d+\.\d%) \| ETA (?P<eta>\d+h\d{2}m|\d+m\d{2}s)"
    r"(?: \| peak mem \d+\.\d GiB)?"
    r" \| experts used (?P<used>\d+)% max/mean (?P<max_mean>\d+\.\d{2})"
    r" cv (?P<cv>\d+\.\d{2}) H (?P<entropy>\d+\.\d{3})$", re.M)
VAL_LINE = re.compile(
    r"\bstep (?P<step>\d+) validation: loss (?P<loss>\d+\.\d{4}), perplexity (?P<ppl>\d+\.\d{2})$",
    re.M)


def _override(name, overrides=RUN):
  """The int value of `--config.<name>=` in `overrides`."""
  [value] = [o.split("=", 1)[1] for o in overrides if o.startswith(f"--config.{name}=")]
  return int(value)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_each_step_once(records):
  keys = [(r["split"], r["step"]) for r in records]
  assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)


def _tensorboard_scalars(workdir):
  """{tag: {step: value}} of the event files under workdir/tensorboard, read as TensorBoard
  does: files in order of their first event, and a SessionLog START at step s (a resumed
  writer's purge_step) drops the steps >= s written before it. A step written twice
  otherwise fails."""
  from tensorboardX.proto import event_pb2
  files = []
  folder = os.path.join(workdir, "tensorboard")
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    events, pos = [], 0
    while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + length + 4 > len(data):
        break  # a record cut off by SIGKILL
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
    files.append(events)
  scalars = {}
  for event in [e for events in sorted(files, key=lambda es: es[0].wall_time) for e in events]:
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      for by_step in scalars.values():
        for step in [s for s in by_step if s >= event.step]:
          del by_step[step]
    for value in event.summary.value:
      by_step = scalars.setdefault(value.tag, {})
      assert event.step not in by_step, (value.tag, event.step)
      by_step[event.step] = value.simple_value
  return scalars


def _assert_tensorboard_matches(workdir):
  """TensorBoard holds exactly metrics.jsonl's scalars (float32) at the same steps."""
  records, scalars = _records(workdir), _tensorboard_scalars(workdir)
  expected = {}
  for r in records:
    for name, value in r.items():
      if name not in ("step", "split"):
        expected.setdefault(f"{r['split']}/{name}", {})[r["step"]] = value
  assert sorted(scalars) == sorted(expected)
  for tag, by_step in expected.items():
    assert sorted(scalars[tag]) == sorted(by_step), tag
    steps = sorted(by_step)
    np.testing.assert_allclose([scalars[tag][s] for s in steps], [by_step[s] for s in steps],
                               rtol=2.0 ** -23, err_msg=tag)
  return scalars


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
  every, keep = _override("checkpoint.every"), _override("checkpoint.keep")
  newest = sorted(set(range(every, STEPS + 1, every)) | {STEPS})[-keep:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(map(str, newest))


def test_console_lines_show_every_promised_field(run_a):
  """Each timed train line has step, loss, lr, tok/s, MFU, ETA and the router's health, equal
  to metrics.jsonl; each validation line its loss and perplexity."""
  workdir, log = run_a
  train = {r["step"]: r for r in _records(workdir) if r["split"] == "train"}
  val = {r["step"]: r for r in _records(workdir) if r["split"] == "val"}
  lines = list(TRAIN_LINE.finditer(log))
  assert [int(m["step"]) for m in lines] == list(range(2, STEPS + 1))  # 1 compiles: untimed
  for m in lines:
    r = train[int(m["step"])]
    assert int(m["total"]) == STEPS and m["mfu"] == "n/a", m[0]  # no peak FLOP/s for a CPU
    for field, value, decimals in (("loss", r["loss"], 4), ("ktok", r["tokens_per_s"] / 1e3, 1),
                                   ("used", 100 * r["experts_used"], 0),
                                   ("max_mean", r["load_max_mean"], 2), ("cv", r["load_cv"], 2),
                                   ("entropy", r["router_entropy"], 3)):
      assert abs(float(m[field]) - value) <= 0.5 * 10.0 ** -decimals + 1e-9, (field, m[0], r)
    assert math.isclose(float(m["lr"]), r["lr"], rel_tol=6e-3), (m[0], r)
    eta = re.fullmatch(r"(?:(\d+)h(\d+)m|(\d+)m(\d+)s)", m["eta"]).groups(default="0")
    seconds = 3600 * int(eta[0]) + 60 * (int(eta[1]) + int(eta[2])) + int(eta[3])
    assert seconds <= r["eta_s"] < seconds + (60 if "h" in m["eta"] else 1), (m[0], r)
  vals = list(VAL_LINE.finditer(log))
  assert [int(m["step"]) for m in vals] == sorted(val)
  for m in vals:
    r = val[int(m["step"])]
    assert abs(float(m["loss"]) - r["loss"]) <= 5e-5 + 1e-9, (m[0], r)
    assert abs(float(m["ppl"]) - r["perplexity"]) <= 5e-3 + 1e-9, (m[0], r)
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)


def test_tensorboard_matches_metrics_jsonl(run_a):
  """The event files hold metrics.jsonl's train and validation scalars at their steps."""
  workdir, _ = run_a
  scalars = _assert_tensorboard_matches(workdir)
  assert sorted(scalars["train/loss"]) == list(range(1, STEPS + 1))
  assert sorted(scalars["val/loss"]) == sorted(scalars["val/perplexity"]) == [50, 100, 150, 200]


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
  _assert_each_step_once(_records(workdir))
  assert _without_timing(_records(workdir)) == _without_timing(_records(workdir_a)), kill_after
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2
  _assert_tensorboard_matches(workdir)  # the killed run's steps after the checkpoint purged
  _, step_a, _, variables_a = sample.load(workdir_a)
  _, step_b, _, variables_b = sample.load(workdir)
  assert step_a == step_b == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables_a),
               jax.device_get(variables_b))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_saves_and_exits_cleanly(tmp_path, signum):
  """SIGTERM or SIGINT: a checkpoint of the step it stopped at, exit status 0."""
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      launch_command(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                     "--config.checkpoint.every=1000"),
      cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  assert _wait_until(proc, lambda: _latest_step(workdir) >= 20)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-4000:]
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(steps) == 1 and int(steps[0]) >= 20
  assert f"{signum.name} at step {steps[0]}: checkpoint saved, stopping" in err
  assert _latest_step(workdir) == int(steps[0])  # stopped at the step it saved


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

  cli = subprocess.run([sys.executable, "-m", "omnimoe.sample", "--workdir", workdir,
                        "--prompt", "def ", "--max_new_tokens", "8"],
                       cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, timeout=300)
  assert cli.returncode == 0, cli.stderr[-4000:]
  assert cli.stdout.startswith(b"def ") and cli.stdout.endswith(b"\n"), cli.stdout
  printed = cli.stdout[:-1]  # print's newline
  assert len(printed) >= len(b"def ") + 8, printed  # a replaced byte prints as 3
  assert printed.decode("utf-8") == "def " + bytes(greedy[:8].astype(np.uint8)).decode(
      "utf-8", errors="replace")  # greedy: the first 8 of the 12 above


def test_sample_draws_byte_ids_only(tiny_config):
  """A vocabulary above 256 (ArrayRecord data may have one) must not wrap ids into bytes."""
  tiny_config.model.vocab_size = 300
  model = build_model(tiny_config.model)
  prompt = jnp.asarray(np.frombuffer(b"ab", np.uint8).astype(np.int32))
  variables = nn.unbox(model.init(jax.random.key(0), prompt[None], train=False))
  kernel = variables["params"]["output"]["kernel"]
  variables["params"]["output"]["kernel"] = kernel.at[:, :256].set(0.0)  # ids >= 256 win
  for temperature in (0.0, 1.0):
    out = np.asarray(sample.generate(model, variables, prompt, 6, temperature,
                                     jax.random.key(1)))
    assert out.shape == (6,) and out.max() < 256, out


@pytest.mark.parametrize("prompt,new,temperature,vocab,message", [
    ("", 4, 0.0, 256, "the prompt must be non-empty"),
    ("ab", 0, 0.0, 256, "max_new_tokens=0: must be >= 1"),
    ("ab", 4, -1.0, 256, r"temperature=-1.0: must be >= 0"),
    ("ab", 4, float("nan"), 256, r"temperature=nan: must be >= 0"),
    ("a\u00e9", 4, 0.0, 128, r"the prompt holds byte 195, outside model.vocab_size=128"),
])
def test_sample_refuses_bad_requests(tiny_config, monkeypatch, prompt, new, temperature, vocab,
                                     message):
  tiny_config.model.vocab_size = vocab
  monkeypatch.setattr(sample, "load", lambda workdir: (tiny_config, 1, None, None))
  with pytest.raises(ValueError, match=message):
    sample.sample_text("unused", prompt, new, temperature, 0)
