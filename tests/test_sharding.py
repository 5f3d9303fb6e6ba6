"""Mesh construction, partition rules, and the sharded train step against one device."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from omnimoe import sample, sharding
from omnimoe.config import ConfigError
from tests.conftest import REPO, SUBPROCESS_ENV, launch_command, run_launch

# (data, fsdp, tensor): the expert tables are split along d over tensor x fsdp.
MESHES = ((1, 2, 1), (2, 2, 2), (1, 4, 2), (8, 1, 1))


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  return {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_mesh_shape_fills_the_free_axis():
  assert sharding.mesh_shape(_mesh_cfg(), 8) == (8, 1, 1)
  assert sharding.mesh_shape(_mesh_cfg(fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(_mesh_cfg(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)


@pytest.mark.parametrize("cfg,match", [
    (_mesh_cfg(fsdp=3), r"mesh.data=-1: the other axes use 3 devices"),
    (_mesh_cfg(data=2, fsdp=2, tensor=1), r"uses 4 devices, but there are 8"),
    (_mesh_cfg(data=-1, fsdp=-1), "at most one axis may be -1"),
    (_mesh_cfg(tensor=0), "mesh.tensor=0: must be a positive integer or -1"),
])
def test_bad_mesh_names_the_field(cfg, match):
  with pytest.raises(ConfigError, match=match):
    sharding.mesh_shape(cfg, 8)


def test_rules():
  assert sharding.mesh_axes(("experts", "expert_embed")) == P(None, ("tensor", "fsdp"))
  assert sharding.mesh_axes(("vocab", "embed")) == P("tensor", "fsdp")
  assert sharding.mesh_axes(("embed", "router")) == P("fsdp", None)
  # Coarse-MoE experts take fsdp first, so their embed axis stays whole.
  assert sharding.mesh_axes(("moe_experts", "embed", "mlp")) == P("fsdp", None, "tensor")
  assert sharding.mesh_axes(("batch", None)) == P(("data", "fsdp"), None)


def test_tree_shardings_and_indivisible_parameter():
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.AXES)
  tree = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 4), np.float32),
                                       ("embed", "mlp")),
          "step": jax.ShapeDtypeStruct((), np.int32)}
  out = sharding.tree_shardings(tree, mesh)
  assert out["w"].spec == P("fsdp", "tensor") and out["step"].spec == P()
  tree["w"] = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 4), np.float32),
                                      ("embed", "mlp"))
  with pytest.raises(ConfigError, match=r"\['w'\] of shape \(6, 4\).*dimension 6.*fsdp"):
    sharding.tree_shardings(tree, mesh)


def check_meshes():
  """Runs in a subprocess with 8 fake CPU devices (see the test below)."""
  from configs import tiny
  from omnimoe import train
  config = tiny.get_config()
  config.train.batch_size = 8
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (8, config.train.seq_len + 1), dtype=np.int32)
             for _ in range(3)]

  def run(shape):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    devices = jax.devices()[:math.prod(shape)]
    program = train.build(config, sharding.make_mesh(config.mesh, devices))
    shardings = jax.tree.map(lambda a: a.sharding, program.abstract_state)
    state = jax.device_put(host_init, shardings)
    losses = []
    for batch in batches:
      tokens = program.global_batch(batch)
      if not losses and len(devices) > 1:  # the expert bank took its sharded path
        with jax.set_mesh(program.mesh):
          assert "shard_map" in str(jax.make_jaxpr(program.train_step)(state, tokens))
      state, metrics = program.train_step(state, tokens)
      losses.append(float(metrics["loss"]))
    return state, losses

  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  reference_program = train.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  host_init = jax.device_get(reference_program.init(jax.random.key(0)))
  boxed = jax.eval_shape(lambda: reference_program.model.init(
      jax.random.key(0), np.zeros((1, config.train.seq_len), np.int32), train=False))
  logical_specs = _leaves(nn.get_partition_spec(boxed["params"]),
                          is_leaf=lambda x: isinstance(x, P))  # logical axis names
  ref_state, ref_losses = run((1, 1, 1))
  for shape in MESHES:
    state, losses = run(shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
    # Adam's g / sqrt(v) magnifies rounding where a gradient is near 0, so parameters get an
    # absolute tolerance of a tenth of one step's size (lr ~1e-3); the losses above are tight.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4,
                                                         err_msg=str(shape)),
                 jax.device_get(state["params"]), jax.device_get(ref_state["params"]))
    _, fsdp, tensor = shape
    up = state["params"]["block_0"]["ffn"]["experts"]["up"]
    assert up.sharding.spec == P(None, ("tensor", "fsdp")), up.sharding.spec
    assert up.addressable_shards[0].data.shape == (64, 32 // (fsdp * tensor))
    embed = state["params"]["embed"]["embedding"]
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert embed.addressable_shards[0].data.shape == (256 // tensor, 32 // fsdp)
    qkv = state["params"]["block_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
    mu = state["opt_state"][1][0].mu["block_0"]["ffn"]["experts"]["up"]
    assert mu.sharding.spec == P(None, ("tensor", "fsdp"))
    if shape == (2, 2, 2):
      check_placements(state, logical_specs)
    print(shape, "max |loss - ref|", np.max(np.abs(np.array(losses) - ref_losses)))
  print("sharded steps match")


def _leaves(tree, is_leaf=None) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def check_placements(state, logical_specs):
  """Every parameter and both AdamW moments of it: spec = RULES of its logical names, and
  each shard = global shape / the sizes of its spec's mesh axes (run by check_meshes)."""
  want = {path: sharding.mesh_axes(tuple(spec)) for path, spec in logical_specs.items()}
  adam = state["opt_state"][1][0]
  for name, tree in (("params", state["params"]), ("mu", adam.mu), ("nu", adam.nu)):
    leaves = _leaves(tree)
    assert sorted(leaves) == sorted(want), (name, sorted(leaves))
    for path, leaf in leaves.items():
      assert len(want[path]) == leaf.ndim, (name, path, want[path])
      assert leaf.sharding.spec == want[path], (name, path, leaf.sharding.spec, want[path])
      sizes = leaf.sharding.mesh.shape
      shard = tuple(dim // math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str)
                                                        else axes or ()))
                    for dim, axes in zip(leaf.shape, want[path]))
      assert len(leaf.addressable_shards) == 8
      for s in leaf.addressable_shards:
        assert s.data.shape == shard, (name, path, s.data.shape, shard)
    # The placements that matter most, spelled out.
    for block in ("block_0", "block_1"):
      for table in ("up", "down"):  # d over tensor x fsdp, the N rows whole
        leaf = leaves[f"['{block}']['ffn']['experts']['{table}']"]
        assert leaf.sharding.spec == P(None, ("tensor", "fsdp")), (name, block, table)
        assert leaf.addressable_shards[0].data.shape == (64, 32 // 4)
    # gate and up in one (d, 2, F) kernel: F over tensor, so each device keeps the gate and
    # up columns of its F-slice together
    gate_up = leaves["['block_0']['ffn']['shared_mlp']['gate_up']['kernel']"]
    assert gate_up.sharding.spec == P("fsdp", None, "tensor"), (name, gate_up.sharding.spec)
    assert gate_up.addressable_shards[0].data.shape == (32 // 2, 2, gate_up.shape[2] // 2)
    output = leaves["['output']['kernel']"]  # (d, vocab): vocab over tensor
    assert output.sharding.spec == P("fsdp", "tensor"), (name, output.sharding.spec)
    assert output.addressable_shards[0].data.shape == (32 // 2, 256 // 2)


def test_sharded_train_step_matches_one_device():
  env = dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-c", "from tests.test_sharding import check_meshes; check_meshes()"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "sharded steps match" in proc.stdout, proc.stdout


def test_checkpoint_from_eight_devices_restores_on_one(tmp_path):
  """A run on a 2x2x2 mesh of 8 (fake CPU) devices saves sharded parameters; a 1-device
  process restores them (orbax reshards onto the new mesh) and trains on from there."""
  workdir = str(tmp_path)
  common = ("--config.train.log_every=1", "--config.checkpoint.every=3",
            "--config.train.eval_every=0", "--config.train.batch_size=8")
  eight = subprocess.run(
      launch_command(workdir, "--config.train.steps=6", "--config.mesh.data=2",
                     "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *common),
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert "mesh data x fsdp x tensor = (2, 2, 2)" in eight.stderr, eight.stderr[-3000:]

  _, step, _, variables = sample.load(workdir)  # this test process: one device
  assert step == 6 and len(jax.devices()) == 1
  for leaf in jax.tree.leaves(variables):
    assert len(leaf.sharding.device_set) == 1 and np.isfinite(np.asarray(leaf)).all()

  one = run_launch(workdir, "--config.train.steps=9", *common)
  assert one.returncode == 0, one.stderr[-3000:]
  assert "resumed from the checkpoint of step 6" in one.stderr
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 10))
  assert abs(losses[7] - losses[6]) < 0.5 * losses[6]  # continues, not from scratch


def train_losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_processes(workdir, devices_per_process, *overrides):
  """Two launch.py processes of one job (`--num_processes=2 --process_id=i
  --coordinator_address=localhost:port`), each with `devices_per_process` fake CPU devices."""
  port = _free_port()
  env = dict(SUBPROCESS_ENV,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  return [subprocess.Popen(
      launch_command(str(workdir), *overrides, "--num_processes=2", f"--process_id={i}",
                     f"--coordinator_address=localhost:{port}"),
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _finish(procs, timeout=300) -> list[str]:
  """Waits for the processes (killing them on timeout); asserts exit 0; their stderr."""
  try:
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]
  return errors


@pytest.mark.parametrize("devices_per_process,mesh", [(4, (2, 2, 2)), (1, (1, 1, 2))],
                         ids=["batch-across-processes", "tensor-across-processes"])
def test_two_processes_match_one_device(tmp_path, devices_per_process, mesh):
  """Two processes train on one mesh and log the losses of a one-device run: with the
  processes along the batch axes (batch, expert-table slices and their collectives across
  both), and along tensor only, where both hold, and so feed, every row of the batch."""
  common = ("--config.train.steps=6", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.batch_size=8")
  mesh_flags = [f"--config.mesh.{axis}={size}" for axis, size in zip(sharding.AXES, mesh)]
  errors = _finish(_start_processes(tmp_path / "two", devices_per_process, *common,
                                    *mesh_flags))
  assert f"2 process(es); mesh data x fsdp x tensor = {mesh}" in errors[0], errors[0][-3000:]

  one = run_launch(str(tmp_path / "one"), *common)
  assert one.returncode == 0, one.stderr[-3000:]
  two, want = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
  assert sorted(two) == sorted(want) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in want], list(want.values()), rtol=1e-5)


@pytest.mark.parametrize("signum,targets", [(signal.SIGTERM, (1,)), (signal.SIGINT, (0,)),
                                            (signal.SIGINT, (0, 1))],
                         ids=["SIGTERM-to-1", "SIGINT-to-0", "SIGINT-to-both"])
def test_stop_signal_to_two_processes_stops_both_at_one_saved_step(tmp_path, signum, targets):
  """SIGTERM or SIGINT to one process (or SIGINT to both, as Ctrl-C in a terminal): both save
  the same step and exit 0 (neither waits forever in a collective that the other left), and
  a restart resumes from it. Each logs the signal it got (SIGTERM if none)."""
  common = ("--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.checkpoint.every=100000", "--config.mesh.data=2")
  procs = _start_processes(tmp_path, 1, "--config.train.steps=100000", *common)
  metrics_file = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no progress"
    time.sleep(0.5)
  for i in targets:
    procs[i].send_signal(signum)
  errors = _finish(procs)
  steps = os.listdir(tmp_path / "checkpoints")
  assert len(steps) == 1 and 3 <= int(steps[0]) < 100000, steps
  saved = int(steps[0])
  for i, err in enumerate(errors):
    name = signum.name if i in targets else "SIGTERM"
    assert f"{name} at step {saved}: checkpoint saved, stopping" in err, err[-3000:]

  errors = _finish(_start_processes(tmp_path, 1, f"--config.train.steps={saved + 1}", *common))
  assert f"resumed from the checkpoint of step {saved}" in errors[0], errors[0][-3000:]
  assert max(train_losses(tmp_path)) == saved + 1
