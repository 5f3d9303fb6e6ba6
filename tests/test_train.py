"""Trainer in-process: config checks, checkpoint fallback, divergence stop, a short run."""
import glob
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from omnimoe import checkpoint as checkpoint_lib
from omnimoe import config as config_lib
from omnimoe import data, metrics, sharding, train
from omnimoe import params as params_lib
from omnimoe.config import ConfigError
from tests import jaxprs


@pytest.mark.parametrize("field,value,match", [
    ("train.batch_size", 6, r"train.batch_size=6: must be divisible by mesh data\*fsdp=4"),
    ("train.seq_len", 65, "train.seq_len=65: must be <= model.max_len=64"),
    ("train.warmup_steps", 12, "train.warmup_steps=12: must be < train.steps=12"),
    ("train.lr", -1.0, "train.lr=-1.0: must be > 0"),
    ("train.expert_lr_scale", 0.0, "train.expert_lr_scale=0.0: must be > 0"),
    ("train.log_every", 0, "train.log_every=0: must be >= 1"),
    ("train.eval_steps", 0, "train.eval_steps=0: must be >= 1"),
    ("data.source", "csv", "data.source='csv': must be one of"),
    ("data.workers", -1, "data.workers=-1: must be >= 0"),
    ("checkpoint.keep", 0, "checkpoint.keep=0: must be >= 1"),
    ("mesh.fsdp", 3, "mesh.data=-1: the other axes use 3 devices"),
    ("model.vocab_size", 100, "model.vocab_size=100: data.source='builtin' is byte-level"),
    ("model.param_dtype", "bfloat16", "model.param_dtype='bfloat16': training keeps float32"),
    ("model.omnimoe.top_k", 65, "model.omnimoe.top_k=65"),
    ("model.attention", "cudnn", "model.attention='cudnn': cuDNN's fused attention needs a GPU"),
])
def test_bad_field_is_named(tiny_config, field, value, match):
  section, *rest = field.split(".")
  node = tiny_config[section]
  for part in rest[:-1]:
    node = node[part]
  node[rest[-1]] = value
  if field != "mesh.fsdp":
    tiny_config.mesh.fsdp = 2  # with 4 devices: data 2 x fsdp 2
  if field == "model.attention":
    tiny_config.model.dtype = "bfloat16"  # the field's own rules hold; the backend does not
  with pytest.raises(ConfigError, match=match):
    train.validate(tiny_config, num_devices=4)


def test_base_config_validates_and_a_missing_field_is_named():
  config = config_lib.base_config()
  train.validate(config, num_devices=1)
  del config.train["debug_nan_step"]
  with pytest.raises(ConfigError, match=r"^train.debug_nan_step: missing field$"):
    train.validate(config, num_devices=1)
  del config["mesh"]
  with pytest.raises(ConfigError, match=r"^mesh: missing section$"):
    train.validate(config, num_devices=1)


def test_missing_data_path_fails_before_compilation(tiny_config, tmp_path, monkeypatch):
  tiny_config.data.source = "text"
  tiny_config.data.path = str(tmp_path / "missing")
  monkeypatch.setattr(train, "build", lambda *a: pytest.fail("compiled before the data check"))
  with pytest.raises(ConfigError, match=r"data.path='.*missing': no such file or folder"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))


def _loader():
  """A fresh training loader over a small synthetic stream."""
  return iter(data.loader(data.TokenWindows(np.arange(1000) % 256, 8, 0, 100), 4, seed=0,
                          shuffle=True))


def _abstract(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      state)


def _corrupt(step_dir):
  """Truncates every data file of a saved state to half its size (a half-written save)."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, monkeypatch):
  make_iter = _loader
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  it = make_iter()
  states = {}
  for step in (1, 2):
    next(it)
    states[step] = {"w": jnp.full((4, 4), float(step)), "step": jnp.int32(step)}
    ckpt.save(step, states[step], it)
  reference = make_iter()
  next(reference)
  expected_next = next(reference)
  ckpt.close()
  _corrupt(str(tmp_path / "checkpoints" / "2"))

  warnings = []
  monkeypatch.setattr(checkpoint_lib.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  abstract = _abstract(states[1])
  fresh = make_iter()
  step, state = ckpt.restore(abstract, fresh)
  assert step == 1 and float(state["w"][0, 0]) == 1.0
  np.testing.assert_array_equal(next(fresh), expected_next)
  assert len(warnings) == 1 and "step 2" in warnings[0] and "falling back" in warnings[0]
  assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "2")
  assert ckpt.latest_step() == 1
  ckpt.save(2, states[2], fresh)  # the set-aside step can be saved again
  ckpt.close()
  _corrupt(str(tmp_path / "checkpoints" / "2"))  # again: set aside beside the first, kept
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  assert ckpt.restore(abstract)[0] == 1
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "corrupt_checkpoints")) == ["2", "2.1"]


def _saved_run(tmp_path, state):
  """A checkpoint folder with `state` saved at step 3 (and a loader position)."""
  it = _loader()
  next(it)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  ckpt.save(3, state, it)
  ckpt.close()
  return it


def _assert_step_3_kept_in_place(tmp_path):
  """`_saved_run`'s step is where it was, and nothing was set aside."""
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")


def test_checkpoint_of_another_layout_is_a_config_error_and_is_kept(tmp_path):
  """A config change (here a wider and a new parameter) must not set good checkpoints aside
  nor start afresh over them."""
  _saved_run(tmp_path, {"params": {"w": jnp.ones((4, 4))}, "step": jnp.int32(3)})
  wanted = {"params": {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32),
                       "b": jax.ShapeDtypeStruct((5,), jnp.float32)},
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  with pytest.raises(ConfigError, match=r"checkpoint step 3 .* \['params'\]\['b'\] is not in "
                     r"the checkpoint"):
    ckpt.restore(wanted)
  del wanted["params"]["b"]
  with pytest.raises(ConfigError, match=r"\['params'\]\['w'\] is \(4, 4\) float32 in the "
                     r"checkpoint, \(4, 5\) float32 in this config"):
    ckpt.restore(wanted)
  wanted["params"]["w"] = jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)  # same shape, other dtype
  with pytest.raises(ConfigError, match=r"\['params'\]\['w'\] is \(4, 4\) float32 in the "
                     r"checkpoint, \(4, 4\) bfloat16 in this config"):
    ckpt.restore(wanted)
  ckpt.close()
  _assert_step_3_kept_in_place(tmp_path)


def test_data_positions_of_another_process_count_are_a_config_error(tmp_path):
  state = {"w": jnp.arange(6.0)}
  _saved_run(tmp_path, state)
  data_dir = tmp_path / "checkpoints" / "3" / "data"
  (name,) = [f for f in os.listdir(data_dir) if f.startswith("process_")]
  for i in range(2):  # as if saved by 2 processes
    shutil.copy(data_dir / name, data_dir / f"process_{i}-of-2.json")
  os.remove(data_dir / name)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  it = _loader()
  abstract = _abstract(state)
  with pytest.raises(ConfigError, match="holds the data positions of 2 process"):
    ckpt.restore(abstract, it)
  assert ckpt.restore(abstract)[0] == 3  # the state alone (omnimoe.sample) still reads
  ckpt.close()
  _assert_step_3_kept_in_place(tmp_path)


def test_step_saved_without_a_layout_restores_unchecked(tmp_path):
  """Checkpoints written before layouts were saved still resume (not set aside)."""
  state = {"w": jnp.arange(6.0)}
  saved_iter = _saved_run(tmp_path, state)
  shutil.rmtree(tmp_path / "checkpoints" / "3" / "layout")
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  it = _loader()
  step, restored = ckpt.restore(_abstract(state), it)
  ckpt.close()
  assert step == 3
  np.testing.assert_array_equal(restored["w"], state["w"])
  np.testing.assert_array_equal(next(it), next(saved_iter))


def test_data_position_that_does_not_fit_the_loader_is_a_config_error(tmp_path):
  """E.g. another data.workers: the state reads, the position does not; nothing is moved."""
  state = {"w": jnp.arange(6.0)}
  _saved_run(tmp_path, state)
  data_dir = tmp_path / "checkpoints" / "3" / "data"
  (name,) = [f for f in os.listdir(data_dir) if f.startswith("process_")]
  (data_dir / name).write_text('{"workers_state": {}}')  # another loader's state
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  it = _loader()
  abstract = _abstract(state)
  with pytest.raises(ConfigError, match="data position does not fit this run's loader"):
    ckpt.restore(abstract, it)
  ckpt.close()
  _assert_step_3_kept_in_place(tmp_path)


def test_corrupt_data_position_is_set_aside_for_the_previous_step(tmp_path, monkeypatch):
  """A truncated data position is a half-written step, not a config change."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  it = _loader()
  for step in (1, 2):
    next(it)
    ckpt.save(step, {"w": jnp.full((3,), float(step))}, it)
  ckpt.close()
  (name,) = glob.glob(str(tmp_path / "checkpoints" / "2" / "data" / "process_*.json"))
  with open(name, "r+") as f:
    f.truncate(os.path.getsize(name) // 2)
  warnings = []
  monkeypatch.setattr(checkpoint_lib.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  step, state = ckpt.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, _loader())
  ckpt.close()
  assert step == 1 and float(state["w"][0]) == 1.0
  assert len(warnings) == 1 and "step 2" in warnings[0] and "JSONDecodeError" in warnings[0]
  assert os.listdir(tmp_path / "corrupt_checkpoints") == ["2"]


@pytest.mark.parametrize("error", [MemoryError("host"), PermissionError(13, "denied"),
                                   RuntimeError("RESOURCE_EXHAUSTED: out of memory")])
def test_machine_error_during_restore_is_raised_and_moves_nothing(tmp_path, monkeypatch, error):
  state = {"w": jnp.arange(6.0)}
  _saved_run(tmp_path, state)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  def failing_read(step, **items):
    if "state" in items:
      raise ValueError("reading the state failed") from error  # as a library wraps it
    return real_read(step, **items)
  real_read = ckpt._read
  monkeypatch.setattr(ckpt, "_read", failing_read)
  with pytest.raises(ValueError, match="reading the state failed"):
    ckpt.restore(_abstract(state), _loader())
  ckpt.close()
  _assert_step_3_kept_in_place(tmp_path)


def test_no_readable_step_raises_instead_of_starting_afresh(tmp_path):
  state = {"w": jnp.arange(6.0)}
  _saved_run(tmp_path, state)
  _corrupt(str(tmp_path / "checkpoints" / "3"))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  with pytest.raises(checkpoint_lib.NoReadableCheckpoint, match=r"none of the 1 checkpoint "
                     r"step\(s\) .* could be read .* moved to .*corrupt_checkpoints"):
    ckpt.restore(_abstract(state), _loader())
  assert ckpt.restore(_abstract(state)) is None  # a relaunch starts from scratch, knowingly
  ckpt.close()
  assert os.listdir(tmp_path / "corrupt_checkpoints") == ["3"]


def test_resume_refuses_a_fixed_field_change_and_logs_the_others(tmp_path, monkeypatch):
  saved = {"model": {"d": 8, "impl": "auto"}, "train": {"seed": 0, "lr": 0.1}}
  state = {"w": jnp.arange(6.0)}
  it = _loader()
  next(it)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  ckpt.save(3, state, it, saved)
  ckpt.close()
  fixed = lambda path: checkpoint_lib.is_under(path, ("model", "train.seed")) and (
      path != "model.impl")
  warnings = []
  monkeypatch.setattr(checkpoint_lib.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  for change, message in ((("train", "seed", 7), r"train.seed=7, but checkpoint step 3 .* "
                           r"saved with train.seed=0"),
                          (("model", "e", 1), r"model.e=1, but .* saved with model.e='<absent>'")):
    config = {section: dict(fields) for section, fields in saved.items()}
    config[change[0]][change[1]] = change[2]
    with pytest.raises(ConfigError, match=message):
      ckpt.restore(_abstract(state), _loader(), config, fixed)
  config = {"model": {"d": 8, "impl": "xla"}, "train": {"seed": 0, "lr": 0.2}}
  assert ckpt.restore(_abstract(state), _loader(), config, fixed)[0] == 3
  ckpt.close()
  assert warnings == ["resuming step 3 with config changes: model.impl 'auto' -> 'xla'; "
                      "train.lr 0.1 -> 0.2"]
  _assert_step_3_kept_in_place(tmp_path)


@pytest.mark.parametrize("path,fixed", [("model.d_model", True), ("model.omnimoe.top_k", True),
                                        ("model.omnimoe.impl", False), ("model.dtype", False),
                                        ("train.seed", True), ("train.seed_x", False),
                                        ("train.lr", False), ("train.steps", False),
                                        ("data.path", True), ("data.workers", False),
                                        ("mesh.fsdp", False)])
def test_trainer_fixes_the_model_and_the_batch_order_on_resume(path, fixed):
  assert train.fixed_on_resume(path) == fixed


def test_refused_resume_leaves_the_runs_config_json(tiny_config, tmp_path):
  tiny_config.train.steps = 4
  train.train_and_evaluate(tiny_config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert written["train"]["seed"] == 0
  tiny_config.train.seed = 5
  with pytest.raises(ConfigError, match="train.seed=5, but checkpoint step 4"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == written


def test_read_only_checkpointer_skips_and_keeps_unreadable_steps(tmp_path):
  state = {"w": jnp.arange(6.0)}
  _saved_run(tmp_path, state)
  _corrupt_state = str(tmp_path / "checkpoints" / "3")
  _corrupt(_corrupt_state)
  tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-0"  # a save in progress
  tmp.mkdir()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
  abstract = _abstract(state)
  assert ckpt.restore(abstract) is None
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", tmp.name]


def test_metrics_resume_drops_a_half_written_line(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 10, "split": "train", "loss": 2.0}\n{"step": 20, "split": "train", "loss": 1.5}\n'
            '{"step": 30, "split": "tr')
  metrics.MetricWriter(str(tmp_path), 20).close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [10, 20]


def test_validation_never_counts_a_window_twice(tiny_config):
  val = data.TokenWindows(np.arange(200) % 256, 16, 0, 10)  # 10 windows: 2 batches of 4
  tiny_config.train.eval_steps = 5
  assert train.eval_batches(tiny_config, val) == 2
  tiny_config.train.eval_steps = 1
  assert train.eval_batches(tiny_config, val) == 1


@pytest.mark.parametrize("log_every,logged", [(1, list(range(1, 7))), (5, [5])])
def test_nan_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, log_every, logged):
  """A NaN at step 7 (checkpoints every 4 steps): checked at every step, or only when
  logging or saving (log_every 5: found at the save of step 8, after which every loss is
  NaN), it is named as step 7, step 8 is not saved and nothing from step 7 on is logged."""
  tiny_config.train.log_every = log_every
  tiny_config.train.debug_nan_step = 7
  workdir = str(tmp_path / "run")
  with pytest.raises(train.TrainingDiverged,
                     match=r"non-finite loss or gradient at step 7 \(.*last good checkpoint "
                           r"is step 4 "):
    train.train_and_evaluate(tiny_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == logged


@pytest.mark.parametrize("steps,eval_every", [(50, 25), (50, 20), (50, 0), (7, 1)])
def test_evaluations_after_counts_the_loops_validations(steps, eval_every):
  t = config_lib.base_config().train
  t.steps, t.eval_every = steps, eval_every
  runs = [s for s in range(1, steps + 1) if (eval_every and s % eval_every == 0) or s == steps]
  for step in range(steps + 1):
    assert train.evaluations_after(step, t) == sum(s > step for s in runs), step


def test_router_health_summary():
  load = np.array([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  health = metrics.router_health(load)
  assert health["experts_used"] == pytest.approx(5 / 8)
  assert health["load_max_mean"] == pytest.approx((4.0 + 1.0) / 2)
  assert health["load_cv"] == pytest.approx((np.sqrt(3.0) + 0.0) / 2)


def test_flops_and_peak():
  from configs import tiny
  cfg = tiny.get_config().model
  assert metrics.flops_per_token(cfg, 32) > 6 * 2 * cfg.d_model ** 2
  assert metrics.peak_flops(jax.devices()[0]) is None  # CPU
  fake_h100 = type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})()
  assert metrics.peak_flops(fake_h100) == 989e12


def test_peer_flops_count_what_its_layer_multiplies():
  """6 FLOPs per parameter undercounts PEER: every head multiplies the shared sub-keys and
  takes its own k pairs. flops_per_token must hold 3x the layer's forward matmul FLOPs
  (from its traced program) where 6x its active parameters would fall short."""
  from configs import tiny
  from omnimoe.layers import ffn_from_config
  cfg = tiny.get_config("peer").model
  c, d, tokens = cfg.peer, cfg.d_model, 8
  layer = ffn_from_config(cfg, jnp.float32, jnp.float32, "ffn")
  x = jnp.ones((tokens, d), jnp.float32)
  variables = layer.init(jax.random.key(0), x, train=False)
  jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x, train=False))(variables)
  matmul_flops = sum(
      2 * np.prod(e.outvars[0].aval.shape)
      * np.prod([e.invars[0].aval.shape[a] for a in e.params["dimension_numbers"][0][0]])
      for e in jaxprs.equations(jaxpr) if e.primitive.name == "dot_general") / tokens
  assert c.num_heads > 1
  params = jax.tree.leaves(nn.unbox(variables))
  counted = (sum(p.size for p in params) - 2 * c.num_experts * d  # tables: touched rows only
             + min(c.num_heads * c.top_k, c.num_experts) * 2 * d)
  assert matmul_flops > 2 * counted  # the premise: more work than parameters
  base = 6 * (params_lib.count_params(cfg)["active_non_embedding"] - cfg.n_layers * counted)
  attention = 12 * cfg.n_layers * d * 32
  np.testing.assert_allclose(metrics.flops_per_token(cfg, 32),
                             base + attention + 3 * cfg.n_layers * matmul_flops, rtol=1e-12)


def test_expert_lr_scale_scales_only_the_expert_tables(tiny_config):
  keys = iter(jax.random.split(jax.random.key(3), 8))
  params = {"block_0": {"ffn": {"experts": {"up": jax.random.normal(next(keys), (9, 5)),
                                            "down": jax.random.normal(next(keys), (9, 5))},
                                "shared_mlp": {"w": jax.random.normal(next(keys), (5, 7))}}},
            "norm": {"scale": jax.random.normal(next(keys), (5,))}}
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)

  def first_update(scale):
    tiny_config.train.expert_lr_scale = scale
    tx, _ = train.make_optimizer(tiny_config.train)
    return tx.update(grads, tx.init(params), params)[0]

  base, scaled = first_update(1.0), first_update(3.5)
  tables = base["block_0"]["ffn"]["experts"]
  assert all(float(jnp.max(jnp.abs(t))) > 0 for t in jax.tree.leaves(base))
  for name in ("up", "down"):
    np.testing.assert_allclose(scaled["block_0"]["ffn"]["experts"][name], 3.5 * tables[name],
                               rtol=1e-6)
  np.testing.assert_array_equal(scaled["block_0"]["ffn"]["shared_mlp"]["w"],
                                base["block_0"]["ffn"]["shared_mlp"]["w"])
  np.testing.assert_array_equal(scaled["norm"]["scale"], base["norm"]["scale"])


def test_schedule_warms_up_then_decays_to_the_final_fraction(tiny_config):
  t = tiny_config.train
  t.lr, t.warmup_steps, t.steps = 2e-3, 3, 20
  _, schedule = train.make_optimizer(t)
  lrs = [float(schedule(s)) for s in range(t.steps + 1)]
  assert lrs[0] == pytest.approx(t.lr / t.warmup_steps, rel=1e-6)
  assert lrs[t.warmup_steps] == pytest.approx(t.lr, rel=1e-6)
  assert lrs[t.steps] == pytest.approx(train.FINAL_LR_FRACTION * t.lr, rel=1e-6)
  after = lrs[t.warmup_steps:]
  assert all(a > b for a, b in zip(after, after[1:])), after


def test_gradients_are_clipped_before_adam(tiny_config):
  """Adam's update is scale-free, so the clip shows in its first moment: one update with a
  gradient of global norm 1000 and grad_clip=1 leaves mu = (1 - b1) * g / |g|, norm 0.1."""
  tiny_config.train.grad_clip = 1.0
  tx, _ = train.make_optimizer(tiny_config.train)
  keys = jax.random.split(jax.random.key(5), 2)
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  grads = {"w": jax.random.normal(keys[0], (6, 5)), "b": jax.random.normal(keys[1], (5,))}
  grads = jax.tree.map(lambda g: g * (1000.0 / optax.tree.norm(grads)), grads)
  assert float(optax.tree.norm(grads)) == pytest.approx(1000.0, rel=1e-5)
  _, state = tx.update(grads, tx.init(params), params)
  adam = state[1][0]  # chain(clip, adamw = chain(scale_by_adam, decay, lr))
  assert isinstance(adam, optax.ScaleByAdamState)
  assert float(optax.tree.norm(adam.mu)) == pytest.approx(0.1, rel=1e-5)


def test_logged_lr_is_the_schedule_of_the_steps_update(tiny_config, tmp_path):
  """train_step logs schedule(updates done before it): step s (1-based) used schedule(s-1)."""
  t = tiny_config.train
  t.steps, t.warmup_steps, t.log_every = 6, 2, 1
  tiny_config.checkpoint.every = 100
  train.train_and_evaluate(tiny_config, str(tmp_path))
  _, schedule = train.make_optimizer(t)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert [r["step"] for r in rows] == list(range(1, t.steps + 1))
  for r in rows:
    assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6), r


def _one_step(config, initial=None):
  """One train_step on a one-device mesh from `initial` (host state; default: init from
  jax.random.key(0)) on a fixed batch: (program, initial, tokens, new state, metrics)."""
  program = train.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  if initial is None:
    initial = jax.device_get(program.init(jax.random.key(0)))
  state = jax.device_put(initial, jax.tree.map(lambda a: a.sharding, program.abstract_state))
  t = config.train
  rng = np.random.default_rng(0)
  tokens = program.global_batch(
      rng.integers(0, config.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32))
  new_state, step_metrics = program.train_step(state, tokens)
  return program, initial, tokens, jax.device_get(new_state), jax.device_get(step_metrics)


def _max_param_change(a, b) -> float:
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))


def test_z_loss_enters_the_objective_and_its_metric(tiny_config):
  """Same state and batch, train.z_loss 0 vs 1: the first update differs (Adam's first step
  is ~lr * sign(g), so some sign flipped) and the metric is z_loss * mean(logsumexp^2)."""
  tiny_config.model.n_layers = 1  # compiles faster; the term is the same
  step_lr = tiny_config.train.lr / tiny_config.train.warmup_steps
  tiny_config.train.z_loss = 0.0
  _, initial, _, off, off_metrics = _one_step(tiny_config)
  tiny_config.train.z_loss = 1.0
  program, _, tokens, on, on_metrics = _one_step(tiny_config, initial)
  assert float(off_metrics["z_loss"]) == 0.0
  assert _max_param_change(off, on) > step_lr

  apply = jax.jit(lambda variables, inputs: program.model.apply(
      variables, inputs, train=True, mutable=["batch_stats"]))
  (logits, _), _ = apply({"params": initial["params"], "batch_stats": initial["batch_stats"]},
                         jnp.asarray(tokens)[:, :-1])
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  assert float(on_metrics["z_loss"]) == pytest.approx(float(jnp.mean(lse ** 2)), rel=1e-5)
  assert float(on_metrics["z_loss"]) > 1.0


def test_the_update_follows_the_gradient_of_ce_plus_z_loss(tiny_config):
  """Adam's first step is -lr g / (|g| + eps) per parameter (global-norm clipping only scales
  g): with weight decay off, the update's signs are the gradient's. They must be those of
  grad(ce + z_loss * mean(logsumexp^2)), computed here from the model itself."""
  tiny_config.model.n_layers = 1
  tiny_config.train.weight_decay = 0.0
  tiny_config.train.z_loss = 0.5
  program, initial, tokens, new, _ = _one_step(tiny_config)
  inputs, targets = jnp.asarray(tokens)[:, :-1], jnp.asarray(tokens)[:, 1:]

  def objective(params):
    (logits, _), _ = program.model.apply(
        {"params": params, "batch_stats": initial["batch_stats"]}, inputs, train=True,
        mutable=["batch_stats"])
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - target) + 0.5 * jnp.mean(lse ** 2)  # OmniMoE: no aux term

  grads = jax.device_get(jax.grad(objective)(initial["params"]))
  for g, before, after in zip(*(jax.tree.leaves(t) for t in (grads, initial["params"],
                                                              new["params"]))):
    clear = np.abs(g) > 1e-3 * np.abs(g).max()  # signs away from rounding
    np.testing.assert_array_equal(np.sign(after - before)[clear], -np.sign(g)[clear])


def test_weight_decay_shrinks_matrices_only(tiny_config):
  tx, schedule = train.make_optimizer(tiny_config.train)
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,)), "scale": jnp.ones((3,))}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  decay = float(schedule(0)) * tiny_config.train.weight_decay
  assert decay > 0
  np.testing.assert_allclose(new["w"], 1.0 - decay, rtol=1e-6)
  np.testing.assert_array_equal(new["b"], params["b"])
  np.testing.assert_array_equal(new["scale"], params["scale"])


def test_eval_step_is_the_next_token_cross_entropy(tiny_config):
  tiny_config.model.n_layers = 1
  program, initial, tokens, _, _ = _one_step(tiny_config)
  state = jax.device_put(initial, jax.tree.map(lambda a: a.sharding, program.abstract_state))
  logits, _ = program.model.apply({"params": initial["params"],
                                   "batch_stats": initial["batch_stats"]},
                                  jnp.asarray(tokens)[:, :-1], train=False)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  want = -jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(tokens)[:, 1:, None], axis=-1))
  assert float(program.eval_step(state, tokens)) == pytest.approx(float(want), rel=1e-5)


def test_coarse_moe_aux_loss_enters_the_objective(tiny_config):
  tiny_config.model.ffn = "coarse_moe"  # its sizes: configs/tiny.py
  tiny_config.model.n_layers = 1
  step_lr = tiny_config.train.lr / tiny_config.train.warmup_steps
  tiny_config.model.coarse_moe.aux_loss_coef = 0.0
  _, initial, _, off, off_metrics = _one_step(tiny_config)
  tiny_config.model.coarse_moe.aux_loss_coef = 1.0
  _, _, _, on, on_metrics = _one_step(tiny_config, initial)
  assert float(off_metrics["aux_loss"]) == 0.0
  # 1 per layer at perfect balance (see layers.CoarseMoE), more when unbalanced.
  assert float(on_metrics["aux_loss"]) >= 0.99
  assert _max_param_change(off, on) > step_lr


def _dot_operand_dtypes(jaxpr) -> list:
  """The operand dtypes of every dot_general in `jaxpr` and the jaxprs nested in it."""
  return [tuple(v.aval.dtype for v in eqn.invars) for eqn in jaxprs.equations(jaxpr)
          if eqn.primitive.name == "dot_general"]


def test_bfloat16_train_step_computes_in_bfloat16(tiny_config):
  """Traced only: the step's matmuls take bf16 operands; params and Adam moments are float32
  before and after it."""
  tiny_config.model.dtype = "bfloat16"
  program = train.build(tiny_config, sharding.make_mesh(tiny_config.mesh, jax.devices()[:1]))
  t = tiny_config.train
  tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32,
                                sharding=sharding.batch_sharding(program.mesh))
  with jax.set_mesh(program.mesh):
    closed = jax.make_jaxpr(program.train_step)(program.abstract_state, tokens)
  dots = _dot_operand_dtypes(closed.jaxpr)
  bf16 = jnp.dtype(jnp.bfloat16)
  assert sum(all(d == bf16 for d in dtypes) for dtypes in dots) > len(dots) / 2, dots
  out_state = jax.tree.unflatten(jax.tree.structure(program.abstract_state),
                                 closed.out_avals[:len(jax.tree.leaves(program.abstract_state))])
  for state in (program.abstract_state, out_state):
    for part in ("params", "opt_state"):
      floats = {a.dtype for a in jax.tree.leaves(state[part])
                if jnp.issubdtype(a.dtype, jnp.floating)}
      assert floats == {jnp.dtype(jnp.float32)}, (part, floats)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state["params"]))


def test_bfloat16_compute_keeps_float32_master_weights(tiny_config, tmp_path):
  from omnimoe import sample
  tiny_config.model.dtype = "bfloat16"
  tiny_config.train.steps = 4
  last = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert np.isfinite(last["loss"]) and last["loss"] < 6.5
  _, step, _, variables = sample.load(str(tmp_path))
  assert step == 4
  assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {np.dtype("float32")}
