"""Where a training step's time goes: whole step, forward, optimizer, per FFN kind.

Builds the jitted program of `omnimoe.train.build` for a config and for other FFN kinds at
equal active parameters (`params.ffn_variant`, what the config files' arg does), on one
batch reused every call (`--inputs data`: the config's first training batch, what the
launcher's first step sees; `random`: uniform random tokens), and times with the shared
bench harness:
  step       `train_step` (forward, backward, AdamW, parameter update), donated state;
  forward    `eval_step` (the model's forward and the loss, no gradients);
  optimizer  the config's optimizer update + `apply_updates` alone, on the step's state;
  backward   what is left: step - forward - optimizer.
A step that is slower for one kind than another at equal active parameters shows here in
which part; `--profile N` lists each step's N most expensive kernels (device time from a
profiler trace) and writes the compiled steps' HLO text beside the JSON, to look the
kernels' fusions up in (see `benchlib.kernel_table`). experiments/RESULTS.md quotes the
figures.

  PYTHONPATH=. python3 experiments/train_step_breakdown.py --config configs/gpu.py \
      --kinds omnimoe,dense [--profile 40] [--config.train.batch_size=8 ...]
"""
from __future__ import annotations

import copy
import json
import os
import sys

import jax
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from experiments.benchlib import kernel_times, run_header, say, timeit
from omnimoe import data, params, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpu.py", "Experiment config file.")
_KINDS = flags.DEFINE_list("kinds", ["omnimoe", "dense"], "FFN kinds at equal active "
                           "parameters (the config's own kind and others)")
_PROFILE = flags.DEFINE_integer("profile", 0, "also list this many most expensive kernels "
                                "of each kind's step (device time, from a profiler trace)")
_INPUTS = flags.DEFINE_enum("inputs", "data", ["data", "random"], "the timed batch: the "
                            "first training batch of the config's data, or uniform random "
                            "tokens")
WIDTH_MULTIPLE = 64  # matched widths rounded as the config files round them


def breakdown(config) -> dict:
  """ms of step, forward, optimizer and backward (the rest) for one config."""
  train.validate(config)
  t = config.train
  program = train.build(config, sharding.make_mesh(config.mesh))
  if _INPUTS.value == "data":
    train_source, _ = data.splits(config.data, t.seq_len, t.batch_size)
    batch = next(iter(data.loader(train_source, t.batch_size, seed=t.seed, shuffle=True)))
  else:
    batch = np.random.default_rng(1).integers(
        0, config.model.vocab_size, (t.batch_size, t.seq_len + 1), np.int32)
  tokens = program.global_batch(batch)
  state = program.init(jax.random.key(t.seed))
  tx, _ = train.make_optimizer(t)
  update = jax.jit(lambda s: optax.apply_updates(
      s["params"], tx.update(s["params"], s["opt_state"], s["params"])[0]))
  out = {"forward": timeit(program.eval_step, [(state, tokens)]),
         "optimizer": timeit(update, [(state,)])}
  holder = [state]

  def step():
    holder[0], metrics = program.train_step(holder[0], tokens)
    return metrics["loss"]

  out["step"] = timeit(step, [()])
  if _PROFILE.value:
    out["kernels"] = kernel_times(step, top=_PROFILE.value)
    out["hlo"] = program.train_step.lower(holder[0], tokens).compile().as_text()
  out["backward"] = out["step"] - out["forward"] - out["optimizer"]
  out["tokens_per_s"] = t.batch_size * t.seq_len / out["step"] * 1e3
  return out


def main(_) -> None:
  say(run_header())
  rows = {kind: breakdown(params.ffn_variant(copy.deepcopy(_CONFIG.value), kind,
                                             WIDTH_MULTIPLE))
          for kind in _KINDS.value}
  say("| ffn | step ms | forward | backward (rest) | optimizer | tokens/s |")
  say("| --- | ---: | ---: | ---: | ---: | ---: |")
  for kind, r in rows.items():
    say(f"| {kind} | {r['step']:.2f} | {r['forward']:.2f} | {r['backward']:.2f} | "
        f"{r['optimizer']:.2f} | {r['tokens_per_s']:,.0f} |")
  if "dense" in rows:  # issue "launch.py": OmniMoE's tokens/s >= 0.85x dense's
    for kind, r in rows.items():
      if kind != "dense":
        ratio = r["tokens_per_s"] / rows["dense"]["tokens_per_s"]
        verdict = (f" (target >= 0.85x: {'met' if ratio >= 0.85 else 'MISSED'})"
                   if kind == "omnimoe" else "")
        say(f"{kind} / dense tokens/s: {ratio:.3f}x{verdict}")
  for kind, r in rows.items():
    for kernel in r.get("kernels", []):
      say(f"{kind:8s} {kernel['ms_per_call']:8.3f} ms {kernel['launches_per_call']:5.0f}x "
          f"{kernel['kernel'][:80]} ({kernel['hlo_op']})")
  if os.environ.get("OUT"):
    for kind, r in rows.items():  # the compiled steps, to look the kernels' hlo_op up in
      if "hlo" in r:
        with open(os.path.join(os.environ["OUT"], f"train-step-{kind}.hlo.txt"), "w") as f:
          f.write(r.pop("hlo"))
    with open(os.path.join(os.environ["OUT"], "train-step-breakdown.json"), "w") as f:
      json.dump(dict(argv=sys.argv, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
