"""Training: checks of the trainer's config sections, sharded train/eval steps, the loop.

  python launch.py --config configs/default.py --workdir /tmp/run

`train_and_evaluate` checks the whole config and opens the data before anything compiles,
restores the newest readable checkpoint in the workdir (or initialises), then runs one
jitted update per global batch. Parameters, BatchNorm statistics and AdamW moments are
placed by `omnimoe.sharding.RULES` on the mesh from `config.mesh`; parameters stay float32
(master weights) while the model computes in `model.dtype`. The objective is next-token
cross-entropy + `train.z_loss` * mean(logsumexp^2) + the model's aux_loss; AdamW (decay on
matrices only) with linear warmup, cosine decay to `FINAL_LR_FRACTION` of `train.lr`, and
global-norm clipping.

Each step is fixed by (config, step): the batch by the loader's seed and position (saved
with the checkpoint), the update by the state; the model has no dropout. So a run that is
killed and resumed ends bit-identical to one that never stopped. A resume whose config
changes a field of `RESUME_FIXED` (the model, the data, the batch order) is refused with a
ConfigError; `config.json` in the workdir is written only once the resume is accepted.

Stopping: SIGTERM or SIGINT saves a checkpoint at the current step and returns (with
several processes, either signal to any of them, at a step they agree on: `_StopRequest`); a
non-finite loss or gradient raises `TrainingDiverged` without saving that state (losses are
checked before every save). `train.debug_nan_step` (a testing hook, -1 = off) poisons the
objective of that step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from omnimoe import checkpoint as checkpoint_lib
from omnimoe import config as config_lib
from omnimoe import data as data_lib
from omnimoe import metrics as metrics_lib
from omnimoe import sharding
from omnimoe.config import ConfigError
from omnimoe.experts import BANK_NAME
from omnimoe.model import build_model

FINAL_LR_FRACTION = 0.1  # the cosine ends at this fraction of train.lr


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became non-finite; the bad state was not saved."""


# ----------------------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------------------

def validate(config, num_devices: int | None = None) -> tuple[int, int, int]:
  """Raises ConfigError naming the first bad field; returns the mesh shape it implies."""
  for section in ("model", "train", "data", "mesh", "checkpoint"):
    if section not in config:
      raise ConfigError(f"{section}: missing section")
  config_lib.validate_model(config.model)
  for name, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("warmup_steps", 0),
                   ("seed", 0), ("log_every", 1), ("eval_every", 0), ("eval_steps", 1),
                   ("debug_nan_step", -1), ("profile_start", 0), ("profile_steps", 1)):
    config_lib.check_int(config_lib.field(config, f"train.{name}"), f"train.{name}", lo)
  for name, positive in (("lr", True), ("weight_decay", False), ("grad_clip", True),
                         ("z_loss", False), ("expert_lr_scale", True)):
    config_lib.check_number(config_lib.field(config, f"train.{name}"), f"train.{name}",
                            positive)
  for path in ("data.source", "data.path", "data.val_fraction", "data.workers", "mesh.data",
               "mesh.fsdp", "mesh.tensor", "checkpoint.every", "checkpoint.keep"):
    config_lib.field(config, path)
  t, m = config.train, config.model
  config_lib.check(t.warmup_steps < t.steps, "train.warmup_steps", t.warmup_steps,
         f"must be < train.steps={t.steps}")
  config_lib.check(t.seq_len <= m.max_len, "train.seq_len", t.seq_len,
         f"must be <= model.max_len={m.max_len}")
  config_lib.check(m.param_dtype == "float32", "model.param_dtype", m.param_dtype,
         "training keeps float32 master weights (set model.dtype for the compute dtype)")
  if m.attention == "cudnn":
    config_lib.check(jax.default_backend() == "gpu", "model.attention", m.attention,
           f"cuDNN's fused attention needs a GPU backend, not {jax.default_backend()!r}")
    config_lib.check(t.seq_len % 2 == 0, "train.seq_len", t.seq_len,
           "must be even with model.attention='cudnn' (its causal kernel refuses odd lengths)")
  d = config.data
  config_lib.check(d.source in data_lib.SOURCES, "data.source", d.source,
         f"must be one of {data_lib.SOURCES}")
  if d.source != "arrayrecord":
    config_lib.check(m.vocab_size >= data_lib.BYTE_VOCAB, "model.vocab_size", m.vocab_size,
           f"data.source={d.source!r} is byte-level and needs >= {data_lib.BYTE_VOCAB}")
  config_lib.check_int(d.workers, "data.workers", 0)
  config_lib.check_int(config.checkpoint.every, "checkpoint.every", 1)
  config_lib.check_int(config.checkpoint.keep, "checkpoint.keep", 1)

  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = sharding.mesh_shape(config.mesh, num_devices)
  batch_ways = shape[0] * shape[1]
  config_lib.check(t.batch_size % batch_ways == 0, "train.batch_size", t.batch_size,
         f"must be divisible by mesh data*fsdp={batch_ways}")
  return shape


# What a resumed run must share with the run that saved its checkpoint: what the model
# computes and which batch comes next. The schedule, logging, mesh, checkpointing, the
# compute dtype and the kernels' and attention's implementation may change (logged).
RESUME_FIXED = ("model", "data.source", "data.path", "data.val_fraction", "train.seed",
                "train.seq_len", "train.batch_size")
RESUME_FREE = ("model.dtype", "model.attention", "model.embed_grad", "model.omnimoe.impl",
               "model.peer.impl")


def fixed_on_resume(path: str) -> bool:
  """Whether the dotted config field `path` must not change when a run resumes."""
  return (checkpoint_lib.is_under(path, RESUME_FIXED)
          and not checkpoint_lib.is_under(path, RESUME_FREE))


# ----------------------------------------------------------------------------------------
# The jitted program: init, train step, eval step, on one mesh.
# ----------------------------------------------------------------------------------------

def is_expert_table(path) -> bool:
  """True for the atomic expert tables (U, V, gate of an `AtomicExpertBank`: OmniMoE's and
  PEER's), the parameters that `train.expert_lr_scale` applies to."""
  return any(getattr(key, "key", None) == BANK_NAME for key in path)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine and global-norm clipping; weight decay on matrices only;
  the atomic expert tables' updates scaled by `expert_lr_scale` (x4 helped OmniMoE in the
  quality ablations: experiments/RESULTS.md, "Ablations")."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=train_cfg.lr / max(train_cfg.warmup_steps, 1), peak_value=train_cfg.lr,
      warmup_steps=train_cfg.warmup_steps, decay_steps=train_cfg.steps,
      end_value=train_cfg.lr * FINAL_LR_FRACTION)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(train_cfg.grad_clip),
           optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train_cfg.weight_decay,
                       mask=decay_mask)]
  if train_cfg.expert_lr_scale != 1.0:
    table_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: is_expert_table(path), params)
    parts.append(optax.masked(optax.scale(train_cfg.expert_lr_scale), table_mask))
  return optax.chain(*parts), schedule


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy and mean logsumexp^2 (the z-loss term), in float32."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(lse - target_logit), jnp.mean(lse ** 2)


def _unbox(tree):
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted pieces of one run on one mesh.

  State is a dict: step (int32, updates done), params, batch_stats (empty without
  BatchNorm), opt_state. `abstract_state` holds its shapes with target shardings (for
  restore); `init(rng)` creates it sharded; `train_step(state, tokens)` -> (state, metrics);
  `eval_step(state, tokens)` -> mean cross-entropy. tokens: (B, L + 1) int32 windows.
  `batch_block` is the block of each batch's rows that this process feeds
  (`sharding.process_batch_block`).
  """
  model: nn.Module
  mesh: jax.sharding.Mesh
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable
  batch_size: int
  batch_block: tuple[int, int]

  def global_batch(self, local_tokens: np.ndarray) -> jax.Array:
    """This process's rows of a batch -> the global (B, L + 1) array, sharded over the
    batch axes."""
    return jax.make_array_from_process_local_data(
        sharding.batch_sharding(self.mesh), local_tokens,
        (self.batch_size,) + local_tokens.shape[1:])


def build(config, mesh: jax.sharding.Mesh) -> Program:
  """Traces shapes only (nothing compiles here): model, optimizer, shardings, jitted steps."""
  model = build_model(config.model)
  tx, schedule = make_optimizer(config.train)
  t = config.train

  def boxed_init(rng):
    variables = model.init(rng, jnp.zeros((1, t.seq_len), jnp.int32), train=False)
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params)}

  boxed = jax.eval_shape(boxed_init, jax.random.key(0))
  state_sharding = sharding.tree_shardings(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _unbox(boxed),
      state_sharding)

  def loss_fn(params, state, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    (logits, aux), updates = model.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, inputs, train=True,
        mutable=["batch_stats"])
    ce, z = cross_entropy(logits, targets)
    objective = ce + t.z_loss * z + aux["aux_loss"]
    if t.debug_nan_step >= 0:
      objective *= jnp.where(state["step"] + 1 == t.debug_nan_step, jnp.nan, 1.0)
    return objective, (ce, z, aux, updates.get("batch_stats", {}))

  def train_step(state, tokens):
    (_, (ce, z, aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state, tokens)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1,
                 "params": optax.apply_updates(state["params"], updates),
                 "batch_stats": batch_stats, "opt_state": opt_state}
    metrics = {"loss": ce, "z_loss": t.z_loss * z, "aux_loss": aux["aux_loss"],
               "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
    if "expert_load" in aux:
      metrics["router_entropy"] = aux["router_entropy"]
      metrics["expert_load"] = aux["expert_load"]
    return new_state, metrics

  def eval_step(state, tokens):
    logits, _ = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                            tokens[:, :-1], train=False)
    return cross_entropy(logits, tokens[:, 1:])[0]

  batch = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  jit = lambda fn, **kw: sharding.on_mesh(jax.jit(fn, **kw), mesh)
  return Program(
      model=model, mesh=mesh, abstract_state=abstract_state,
      init=jit(lambda rng: _unbox(boxed_init(rng)), out_shardings=state_sharding),
      train_step=jit(train_step, in_shardings=(state_sharding, batch),
                     out_shardings=(state_sharding, replicated), donate_argnums=0),
      eval_step=jit(eval_step, in_shardings=(state_sharding, batch),
                    out_shardings=replicated),
      batch_size=t.batch_size, batch_block=sharding.process_batch_block(mesh, t.batch_size))


# ----------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------

class _StopRequest:
  """When to save and stop. One process: SIGTERM/SIGINT set a flag that the loop reads
  after each step. Several processes must stop at one step, or one would wait in a collective
  for the others: JAX's preemption service (installed by `jax.distributed.initialize`) catches
  SIGTERM to any of them in C++ and agrees on the step
  (`multihost_utils.reached_preemption_sync_point`); SIGINT is forwarded to it as a SIGTERM
  to this process. Our handlers are replaced by the previous ones at the first signal, so a
  second one acts at once (with several processes, a second SIGINT)."""

  def __init__(self):
    self.signum = None
    self._several = jax.process_count() > 1
    signals = (signal.SIGINT,) if self._several else (signal.SIGTERM, signal.SIGINT)
    self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self.restore()
    if self._several:
      os.kill(os.getpid(), signal.SIGTERM)

  def at(self, step: int) -> int | None:
    """The signal to stop for after `step` (called once per step, by every process)."""
    if not self._several:
      return self.signum
    if multihost_utils.reached_preemption_sync_point(step):
      return self.signum or signal.SIGTERM  # SIGTERM: sent to this process or another one
    return None

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class _Interval:
  """Per-step scalars since the last log (device arrays until read), the expert loads summed
  on the device, and a clock for throughput restarted after compilation and evaluation."""

  def __init__(self):
    self.pending, self.checked, self.load = [], 0, None
    self.restart_clock()

  def restart_clock(self) -> None:
    self.t0, self.timed_steps = time.perf_counter(), 0

  def add(self, metrics: dict) -> None:
    metrics = dict(metrics)
    if "expert_load" in metrics:
      load = metrics.pop("expert_load")
      self.load = load if self.load is None else self.load + load
    self.pending.append(metrics)
    self.timed_steps += 1

  def first_non_finite(self, last_step: int) -> tuple[int, float] | None:
    """(step, loss) of the first unchecked step whose loss or gradient is not finite."""
    new = jax.device_get([(m["loss"], m["grad_norm"]) for m in self.pending[self.checked:]])
    first = last_step - len(new) + 1
    self.checked = len(self.pending)
    for i, (loss, grad_norm) in enumerate(new):
      if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        return first + i, float(loss)
    return None

  def summary(self, tokens_per_step: int) -> dict:
    """Means over the interval, lr of its last step, throughput, router health; resets."""
    host, load = jax.device_get((self.pending, self.load))
    out = {k: float(np.mean([m[k] for m in host]))
           for k in ("loss", "z_loss", "aux_loss", "grad_norm")}
    out["lr"] = float(host[-1]["lr"])
    if load is not None:
      out["router_entropy"] = float(np.mean([m["router_entropy"] for m in host]))
      out.update(metrics_lib.router_health(load))
    if self.timed_steps:  # none when the interval held only the compiling step
      elapsed = time.perf_counter() - self.t0
      out["step_time_s"] = elapsed / self.timed_steps
      out["tokens_per_s"] = self.timed_steps * tokens_per_step / elapsed
    self.pending, self.checked, self.load = [], 0, None
    self.restart_clock()
    return out


def evaluations_after(step: int, train_cfg) -> int:
  """How many validations the loop runs after `step`: every `eval_every` and at the end."""
  t = train_cfg
  if step >= t.steps:
    return 0
  periodic = t.steps // t.eval_every - step // t.eval_every if t.eval_every else 0
  return periodic + (0 if t.eval_every and t.steps % t.eval_every == 0 else 1)


def eval_batches(config, val_source) -> int:
  """`train.eval_steps`, capped so that no validation window is counted twice."""
  return min(config.train.eval_steps, len(val_source) // config.train.batch_size)


def evaluate(program: Program, state, val_source, config) -> dict:
  """Mean cross-entropy and perplexity on the first `eval_batches` validation batches."""
  t = config.train
  batches = iter(data_lib.loader(val_source, t.batch_size, seed=t.seed, shuffle=False,
                                 block=program.batch_block))
  losses = [program.eval_step(state, program.global_batch(next(batches)))
            for _ in range(eval_batches(config, val_source))]
  loss = float(np.mean(jax.device_get(losses)))
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class _ProfileWindow:
  """A profiler trace of steps [start, start + steps) of the loop as it runs (data loading,
  logging and all), written to `directory`; `experiments/trace_summary.py` reads it."""

  def __init__(self, start: int, steps: int, directory: str):
    self.start, self.end, self.directory, self.active = start, start + steps - 1, directory, False

  def before(self, step: int) -> None:
    if self.start and step == self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.end:
      self.close(state)

  def close(self, state=None) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profiler trace of steps %d-%d written to %s", self.start, self.end,
                   self.directory)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains to `train.steps` (resuming from the workdir); returns the last train metrics."""
  shape = validate(config)
  t = config.train
  train_source, val_source = data_lib.splits(config.data, t.seq_len, t.batch_size,
                                             vocab_size=config.model.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  program = build(config, mesh)
  flops_per_token = metrics_lib.flops_per_token(config.model, t.seq_len)
  peak = metrics_lib.peak_flops(jax.devices()[0])
  tokens_per_step = t.batch_size * t.seq_len
  logging.info("devices: %d x %s, %d process(es); mesh data x fsdp x tensor = %s",
               jax.device_count(), jax.devices()[0].device_kind, jax.process_count(), shape)
  logging.info("data: %s, %d training and %d validation windows of %d tokens",
               config.data.source, len(train_source), len(val_source), t.seq_len)
  if (val_batches := eval_batches(config, val_source)) < t.eval_steps:
    logging.warning("train.eval_steps=%d: the validation split holds %d batches; each "
                    "validation uses those", t.eval_steps, val_batches)
  logging.info("model: %s FFN, %.2fM parameters, %.1f MFLOP per token (training)",
               config.model.ffn, sum(math.prod(a.shape) for a in
                                     jax.tree.leaves(program.abstract_state["params"])) / 1e6,
               flops_per_token / 1e6)

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.checkpoint.keep)
  train_iter = iter(data_lib.loader(train_source, t.batch_size, seed=t.seed, shuffle=True,
                                    workers=config.data.workers,
                                    block=program.batch_block))
  config_json = json.loads(config.to_json_best_effort())
  restored = ckpt.restore(program.abstract_state, train_iter, config_json, fixed_on_resume)
  if jax.process_index() == 0:  # only now: a refused resume leaves the run's own config
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_json, f, indent=2)
  if restored is None:
    start, state = 0, program.init(jax.random.key(t.seed))
    logging.info("starting from scratch in %s", workdir)
  else:
    start, state = restored
    logging.info("resumed from the checkpoint of step %d in %s", start, workdir)
  if start >= t.steps:
    logging.info("nothing to do: step %d >= train.steps=%d", start, t.steps)

  writer = metrics_lib.MetricWriter(workdir, start)
  stop = _StopRequest()
  interval = _Interval()
  last = {}
  profile = _ProfileWindow(t.profile_start, t.profile_steps, os.path.join(workdir, "profile"))
  eval_seconds = 0.0  # no estimate before the first validation
  try:
    for step in range(start + 1, t.steps + 1):
      profile.before(step)
      state, step_metrics = program.train_step(state, program.global_batch(next(train_iter)))
      profile.after(step, state)
      interval.add(step_metrics)
      if step == start + 1:
        jax.block_until_ready(state)
        logging.info("first step (compilation included) took %.1f s",
                     time.perf_counter() - interval.t0)
        interval.restart_clock()
      stopping = stop.at(step)  # read once: a signal landing later in this step waits for the next
      save = step % config.checkpoint.every == 0 or step == t.steps or stopping is not None
      validate_now = (t.eval_every and step % t.eval_every == 0) or step == t.steps
      if save or validate_now or step % t.log_every == 0:
        bad = interval.first_non_finite(step)
        if bad is not None:
          raise TrainingDiverged(
              f"non-finite loss or gradient at step {bad[0]} (loss {bad[1]}); stopped without "
              f"saving it; the last good checkpoint is step {ckpt.latest_step()} in "
              f"{ckpt.directory}")
      if step % t.log_every == 0:
        last = interval.summary(tokens_per_step)
        if "tokens_per_s" in last:
          # Validations still to run, this step's included.
          last["eta_s"] = ((t.steps - step) * last["step_time_s"]
                           + evaluations_after(step - 1, t) * eval_seconds)
          if peak is not None:
            last["mfu"] = flops_per_token * last["tokens_per_s"] / (peak * jax.device_count())
        if (peak_gib := metrics_lib.peak_memory_gib()) is not None:
          last["peak_gib"] = peak_gib
        writer.write(step, "train", last)
        logging.info(metrics_lib.format_train_line(step, t.steps, last))
      if validate_now:
        eval_start = time.perf_counter()
        val = evaluate(program, state, val_source, config)
        eval_seconds = time.perf_counter() - eval_start  # the latest (the first compiles)
        writer.write(step, "val", val)
        logging.info("step %d validation: loss %.4f, perplexity %.2f", step, val["loss"],
                     val["perplexity"])
        interval.restart_clock()
      if save:
        ckpt.save(step, state, train_iter, config_json)
      if stopping is not None:
        logging.warning("%s at step %d: checkpoint saved, stopping",
                        signal.Signals(stopping).name, step)
        break
  finally:
    profile.close()
    stop.restore()
    ckpt.close()
    writer.close()
  return last
