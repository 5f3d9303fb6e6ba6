"""Shared test setup: absl flags marked parsed (grain needs it) and the trainer's fixtures."""
import os
import subprocess
import sys
import tempfile

import pytest
from absl import flags

from configs import tiny

flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses share a persistent compilation cache: runs of one config compile once.
SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS="cpu",
                      JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                             "omnimoe-tests-jax-cache"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture
def tiny_config():
  """configs/tiny.py shrunk further for fast in-process training tests."""
  config = tiny.get_config()
  config.train.steps = 12
  config.train.batch_size = 4
  config.train.seq_len = 16
  config.train.warmup_steps = 2
  config.train.log_every = 1
  config.train.eval_every = 0
  config.train.eval_steps = 1
  config.checkpoint.every = 4
  return config


def launch_command(workdir, *overrides, config="configs/tiny.py"):
  """argv of `launch.py` on `config` with `--config.a.b=v` overrides."""
  return [sys.executable, os.path.join(REPO, "launch.py"), f"--config={config}",
          f"--workdir={workdir}", *overrides]


def run_launch(workdir, *overrides, timeout=300):
  """Runs launch.py to completion in a subprocess; returns the CompletedProcess."""
  return subprocess.run(launch_command(workdir, *overrides), cwd=REPO, env=SUBPROCESS_ENV,
                        capture_output=True, text=True, timeout=timeout)
