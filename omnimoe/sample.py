"""Generate text from the latest checkpoint of a training run, with the KV cache.

  python -m omnimoe.sample --workdir DIR --prompt "def main(" \
      [--max_new_tokens 200 --temperature 0.0 --seed 0]   # the defaults

Byte-level, like the built-in and text data: the prompt is encoded as UTF-8 bytes and the
output decoded with replacement characters; only the ids 0..255 are sampled (a larger
vocabulary's other ids never are), and a model whose `model.vocab_size` cannot hold the
prompt's bytes is refused. Temperature 0 is greedy (argmax). The prompt is prefilled in one
call, then each new token is one cached decoding step; prompt plus new tokens must fit in
`model.max_len`.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from omnimoe import checkpoint as checkpoint_lib
from omnimoe import data as data_lib
from omnimoe import metrics
from omnimoe import sharding
from omnimoe import train


def load(workdir: str):
  """(config, step, model, variables) of the run's newest readable checkpoint, on one
  device."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  program = train.build(config, mesh)
  # Read-only: a run may be saving into this folder right now.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  restored = ckpt.restore(program.abstract_state)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}/checkpoints")
  step, state = restored
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return config, step, program.model, variables


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def generate(model, variables, prompt: jax.Array, max_new_tokens: int, temperature: float,
             rng: jax.Array) -> jax.Array:
  """`max_new_tokens` byte ids (int32, < 256) continuing `prompt` (P,) int32; greedy at
  temperature 0."""
  (logits, _), cache = model.apply(variables, prompt[None], train=False, decode=True,
                              mutable=["cache"])

  def body(carry, key):
    cache, logits = carry
    logits = logits[:, :data_lib.BYTE_VOCAB]
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
    (logits, _), cache = model.apply({**variables, **cache}, token[:, None], train=False,
                                decode=True, mutable=["cache"])
    return (cache, logits[:, -1]), token[0]

  _, tokens = jax.lax.scan(body, (cache, logits[:, -1]), jax.random.split(rng, max_new_tokens))
  return tokens


def sample_text(workdir: str, prompt: str, max_new_tokens: int, temperature: float,
                seed: int) -> str:
  """The prompt's continuation as text (bytes decoded as UTF-8 with replacement)."""
  if not prompt:
    raise ValueError("the prompt must be non-empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
  config, step, model, variables = load(workdir)
  tokens = np.frombuffer(prompt.encode("utf-8"), dtype=np.uint8).astype(np.int32)
  if tokens.max() >= config.model.vocab_size:
    raise ValueError(f"the prompt holds byte {tokens.max()}, outside model.vocab_size="
                     f"{config.model.vocab_size}: this sampler is byte-level")
  if tokens.size + max_new_tokens > config.model.max_len:
    raise ValueError(f"prompt of {tokens.size} bytes + max_new_tokens={max_new_tokens} exceeds "
                     f"model.max_len={config.model.max_len} (checkpoint of step {step})")
  out = generate(model, variables, jnp.asarray(tokens), max_new_tokens, float(temperature),
                 jax.random.key(seed))
  return bytes(np.asarray(out, np.uint8)).decode("utf-8", errors="replace")


_WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder (config.json, checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  text = sample_text(_WORKDIR.value, _PROMPT.value, _MAX_NEW.value, _TEMPERATURE.value,
                     _SEED.value)
  print(_PROMPT.value + text)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(main)
