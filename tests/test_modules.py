"""Router, expert bank, FFN blocks and the LM, checked against brute force and by hand."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import config as config_lib
from omnimoe import experts as experts_lib
from omnimoe import layers, params, reference
from omnimoe import router as router_lib
from omnimoe.model import Attention, TokenEmbedding, attention_impl, build_model
from omnimoe.pallas import router_topk
from tests import jaxprs

KINDS = ("omnimoe", "dense", "coarse_moe", "peer")
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_model_config(ffn="omnimoe", **omnimoe):
  """A tiny LM config with awkward sizes (d 24, 3 heads of 8, N 49 = 7 x 7)."""
  cfg = config_lib.model_config()
  cfg.ffn = ffn
  cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.max_len = 61, 24, 3, 2, 16
  cfg.dense.ffn_dim = 40
  cfg.omnimoe.update(num_experts=49, top_k=5, shared_ffn_dim=20, **omnimoe)
  cfg.coarse_moe.update(num_experts=6, top_k=2, num_shared=1, expert_dim=12)
  cfg.peer.update(num_experts=36, top_k=4, num_heads=3, key_dim=10)
  return cfg


def tokens(key, shape, vocab=61):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab, jnp.int32)


def init(module, *args):
  """Jitted `module.init(key, *args, train=False)` (op-by-op init is slow)."""
  return jax.jit(lambda key, *a: module.init(key, *a, train=False))(jax.random.key(1), *args)


def run(module, variables, *args):
  """Jitted `module.apply(variables, *args, train=False)`."""
  return jax.jit(lambda v, *a: module.apply(v, *a, train=False))(variables, *args)


def normal(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


# ----------------------------------------------------------------------------- router


def brute_force_route(x, p, n, k, weights_mode, mean=None, var=None):
  """Full top-k over all N = n*n scores; normalisation with the given (mean, var) or none."""
  log_probs = []
  for axis in ("x", "y"):
    logits = x @ p[f"gate_{axis}"]
    if mean is not None:
      logits = (logits - mean[axis]) / jnp.sqrt(var[axis] + router_lib.BN_EPSILON)
    log_probs.append(jax.nn.log_softmax(logits, axis=-1))
  lx, ly = log_probs
  full = (lx[:, :, None] + ly[:, None, :]).reshape(x.shape[0], n * n)
  scores, indices = jax.lax.top_k(full, k)
  weights = jnp.exp(scores) if weights_mode == "exp" else jax.nn.softmax(scores, axis=-1)
  return weights, indices, lx, ly


@pytest.mark.parametrize("weights_mode", ["exp", "softmax"])
@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_router_matches_brute_force_topk(weights_mode, norm):
  n, k, x = 9, 7, normal(0, (37, 20))
  router = router_lib.CartesianRouter(n * n, k, weights_mode, norm)
  variables = init(router, x)
  p = nn.unbox(variables["params"])
  stats = variables.get("batch_stats")
  for train in (False, True):
    (w, idx, aux), _ = router.apply(variables, x, train=train, mutable=["batch_stats"])
    if norm == "none":
      mean = var = None
    elif train:  # batch statistics (biased variance)
      mean = {a: jnp.mean(x @ p[f"gate_{a}"], 0) for a in "xy"}
      var = {a: jnp.var(x @ p[f"gate_{a}"], 0) for a in "xy"}
    else:  # running statistics, at their initial values
      mean = {a: stats[f"norm_{a}"]["mean"] for a in "xy"}
      var = {a: stats[f"norm_{a}"]["var"] for a in "xy"}
    w_ref, idx_ref, lx, ly = brute_force_route(x, p, n, k, weights_mode, mean, var)
    assert w.dtype == jnp.float32 and idx.dtype == jnp.int32 and w.shape == (37, k)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(w, w_ref, **TOL)
    # Entropy of p_x(i) p_y(j) over the full grid, by brute force.
    full = (lx[:, :, None] + ly[:, None, :]).reshape(37, -1)
    entropy = jnp.mean(-jnp.sum(jnp.exp(full) * full, axis=-1))
    np.testing.assert_allclose(aux["entropy"], entropy, rtol=1e-5)
    np.testing.assert_array_equal(aux["load"], np.bincount(np.ravel(idx_ref), minlength=n * n))


def test_batchnorm_running_stats_update_and_are_used_in_eval():
  n, x = 6, normal(2, (29, 16), scale=3.0) + 1.5
  router = router_lib.CartesianRouter(n * n, 4, "exp", "batchnorm")
  variables = init(router, x)
  p = nn.unbox(variables["params"])
  _, updated = router.apply(variables, x, train=True, mutable=["batch_stats"])
  m = router_lib.BN_MOMENTUM
  for a in "xy":
    logits = x @ p[f"gate_{a}"]
    new = updated["batch_stats"][f"norm_{a}"]
    np.testing.assert_allclose(new["mean"], (1 - m) * jnp.mean(logits, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], m + (1 - m) * jnp.var(logits, 0), rtol=1e-5)
  # Evaluation uses the running statistics (here: after one update), not the batch's.
  evald = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
  w, idx, _ = router.apply(evald, x[:5], train=False)
  stats = updated["batch_stats"]
  w_ref, idx_ref, _, _ = brute_force_route(
      x[:5], p, n, 4, "exp", {a: stats[f"norm_{a}"]["mean"] for a in "xy"},
      {a: stats[f"norm_{a}"]["var"] for a in "xy"})
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])  # pallas: interpret mode on the CPU
def test_router_gradients_reach_gates(impl):
  """The weights' gradient in the gates equals the brute-force router's (full top-k over
  the N scores, differentiated by JAX)."""
  n, k, x = 5, 3, normal(4, (23, 12))
  router = router_lib.CartesianRouter(n * n, k, "softmax", "none", impl=impl)
  variables = init(router, x)
  coef = normal(6, (k,))

  def loss(p):
    w, _, _ = router.apply({"params": p}, x, train=False)
    return jnp.sum(w * coef)

  def brute_loss(p):
    return jnp.sum(brute_force_route(x, nn.unbox(p), n, k, "softmax")[0] * coef)

  grads, want = (nn.unbox(jax.grad(f)(variables["params"])) for f in (loss, brute_loss))
  for a in "xy":
    assert np.any(want[f"gate_{a}"] != 0)
    np.testing.assert_allclose(grads[f"gate_{a}"], want[f"gate_{a}"], **TOL)


def test_router_takes_its_experts_unsorted_past_the_fused_kernel():
  """Above `router_topk.MAX_KERNEL_K` the Pallas top-k (threshold search) sorts its (T, k)
  output only when asked to; the router asks for the set, so its program holds no sort of
  k-wide rows, and still routes each token to the brute-force top k (here in interpret
  mode on the CPU)."""
  n, k, x = 11, router_topk.MAX_KERNEL_K + 6, normal(5, (13, 16))
  router = router_lib.CartesianRouter(n * n, k, "exp", "none", impl="pallas")
  variables = init(router, x)
  w, idx, _ = router.apply(variables, x, train=False)
  w_ref, idx_ref, _, _ = brute_force_route(x, nn.unbox(variables["params"]), n, k, "exp")
  by_id, ref_by_id = np.argsort(idx, axis=1), np.argsort(idx_ref, axis=1)
  np.testing.assert_array_equal(np.take_along_axis(idx, by_id, 1),
                                np.take_along_axis(idx_ref, ref_by_id, 1))
  np.testing.assert_allclose(np.take_along_axis(w, by_id, 1),
                             np.take_along_axis(w_ref, ref_by_id, 1), **TOL)
  traced = jax.make_jaxpr(lambda v: router.apply(v, x, train=False))(variables)
  row_sorts = [e for e in jaxprs.equations(traced)
               if e.primitive.name == "sort" and e.invars[0].aval.shape[-1] == k]
  assert not row_sorts


# ----------------------------------------------------------------------------- FFN blocks


def swiglu(x, p):
  gate_up = p["gate_up"]["kernel"]  # (d, 2, hidden): gate first
  return (jax.nn.silu(x @ gate_up[:, 0]) * (x @ gate_up[:, 1])) @ p["down"]["kernel"]


@pytest.mark.parametrize("weights_mode,activation", [("exp", "silu"), ("softmax", "silu"),
                                                     ("exp", "swiglu")])
def test_omnimoe_layer_is_shared_mlp_plus_reference_experts(weights_mode, activation):
  x = normal(6, (2, 9, 24))
  layer = layers.OmniMoELayer(49, 5, 20, activation, weights_mode, "batchnorm")
  variables = init(layer, x)
  p = nn.unbox(variables["params"])
  y, aux = run(layer, variables, x)
  tokens = x.reshape(-1, 24)
  stats = variables["batch_stats"]["router"]
  w, idx, _, _ = brute_force_route(tokens, p["router"], 7, 5, weights_mode,
                                   {a: stats[f"norm_{a}"]["mean"] for a in "xy"},
                                   {a: stats[f"norm_{a}"]["var"] for a in "xy"})
  routed = reference.atomic_experts(tokens, p["experts"]["up"], p["experts"]["down"], w, idx,
                                    activation, p["experts"].get("gate"))
  expected = swiglu(tokens, p["shared_mlp"]) + routed
  np.testing.assert_allclose(y.reshape(-1, 24), expected, rtol=1e-4, atol=1e-5)
  assert aux["expert_load"].shape == (49,) and float(aux["expert_load"].sum()) == 18 * 5
  assert float(aux["aux_loss"]) == 0.0 and 0 < float(aux["router_entropy"]) <= math.log(49)


def rule_and_pairs(n, k, shared, x, cot, dtype=jnp.float32):
  """The OmniMoE layer (N = n^2, top k) in training mode on impl "pallas" (the rule path,
  where `routes_by_rule`) and on impl "xla" (pairs), same parameters: for each, the value
  and aux of <layer(x), cot> and the parameter gradients; and the Pallas kernels of the
  first one's program."""
  layers_ = [layers.OmniMoELayer(n * n, k, shared, "silu", "exp", "batchnorm", impl=impl,
                                 dtype=dtype) for impl in ("pallas", "xla")]
  variables = init(layers_[1], x)

  def loss(params, layer):
    (y, aux), _ = layer.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.vdot(y, cot), aux

  kernels = [e.params["name"] for e in jaxprs.equations(jax.make_jaxpr(
      lambda p: loss(p, layers_[0]))(variables["params"]).jaxpr)
             if e.primitive.name == "pallas_call"]
  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  return [step(variables["params"], layer) for layer in layers_], kernels


def assert_grads_close(grads, want, tol):
  want = dict(jax.tree_util.tree_leaves_with_path(nn.unbox(want)))
  for path, g in jax.tree_util.tree_leaves_with_path(nn.unbox(grads)):
    assert float(jnp.linalg.norm(g - want[path]) / jnp.linalg.norm(want[path])) < tol, path


def test_omnimoe_layer_routes_by_the_rule_where_it_wins_with_the_pairs_results():
  """On the Pallas path, k past the fused top-k kernel and the dense regime, the layer
  hands the bank the top-k as a rule (theta, cut) and emits no pairs: the same output,
  expert load, entropy and gradients as the pairs path (XLA), float32."""
  t, n, k, d = 18, 12, 80, 24
  for mode, activation, impl, kk, want in (("exp", "silu", "pallas", k, True),
                                           ("softmax", "silu", "pallas", k, False),
                                           ("exp", "swiglu", "pallas", k, False),
                                           ("exp", "silu", "xla", k, False),
                                           ("exp", "silu", "pallas", 64, False)):
    assert router_lib.routes_by_rule(t, kk, n * n, mode, activation, impl) == want
  for k_head, want in ((2048, True), (1024, False)):  # the measured crossover, N = 320^2
    assert router_lib.routes_by_rule(4096, k_head, 320 ** 2, "exp", "silu", "pallas") == want
  x = normal(7, (2, t // 2, d))
  (((value, aux), grads), ((value_want, aux_want), grads_want)), kernels = rule_and_pairs(
      n, k, 20, x, normal(8, x.shape))
  assert "atomic_experts_rule_forward_grid" in kernels and "router_emit" not in kernels
  np.testing.assert_allclose(value, value_want, rtol=1e-5)
  np.testing.assert_array_equal(aux["expert_load"], aux_want["expert_load"])
  assert float(aux["expert_load"].sum()) == t * k
  np.testing.assert_allclose(aux["router_entropy"], aux_want["router_entropy"], rtol=1e-6)
  assert_grads_close(grads, grads_want, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_omnimoe_layer_on_the_rule_path_on_gpu():
  """The compiled rule path in the Flax layer at a real grid (T = 1024, k = 4096,
  N = 320^2, bf16 compute, float32 parameters) against the XLA pairs path: output, expert
  load and parameter gradients."""
  t, n, k, d = 1024, 320, 4096, 1024
  assert router_lib.routes_by_rule(t, k, n * n, "exp", "silu", "pallas")
  x = normal(9, (1, t, d))
  (((value, aux), grads), ((value_want, aux_want), grads_want)), _ = rule_and_pairs(
      n, k, 1024, x, normal(10, x.shape), jnp.bfloat16)
  assert abs(float(value - value_want)) <= 1e-3 * abs(float(value_want))
  np.testing.assert_array_equal(aux["expert_load"], aux_want["expert_load"])
  assert float(aux["expert_load"].sum()) == t * k
  assert_grads_close(grads, grads_want, 2e-2)


def test_tables_are_cast_wherever_the_op_takes_the_dense_path():
  """The dense path's grid GEMMs run in the tables' dtype: the bank must hand it bf16
  copies (float32 tables would make them float32 GEMMs over the whole grid)."""
  from omnimoe.pallas import expert_ops
  dense = 0
  for n in (4096, 320 * 320, 2 ** 20):
    for k in (16, 32, 128, 512, 1024, 4096):
      for t in (1, 3, 16, 40, 64, 1024, 4096):
        if k <= n and expert_ops.choose_path(t, k, n) == "dense":
          dense += 1
          assert experts_lib.cast_tables(t * k, n), (t, k, n)
  assert dense > 20


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("num_experts,cast", [(400, False), (9, True)])
def test_bank_reads_float32_tables_as_stored_when_pairs_are_fewer_than_rows(
    num_experts, cast, impl):
  """float32 parameters, bf16 compute: with T k < N / 2 the op gets the tables as stored
  (no (N, d) cast in the program), with T k >= N / 2 bf16 copies. Values and gradients match the
  float32 reference of what the op sees either way, and the gradients are float32."""
  t, d, k = 30, 24, 5
  assert experts_lib.cast_tables(t * k, num_experts) == cast
  bank = experts_lib.AtomicExpertBank(num_experts, impl=impl, dtype=jnp.bfloat16,
                                      param_dtype=jnp.float32)
  x = normal(20, (t, d)).astype(jnp.bfloat16).astype(jnp.float32)
  tables = {"up": normal(21, (num_experts, d), 0.3), "down": normal(22, (num_experts, d), 0.3)}
  weights = jax.random.uniform(jax.random.key(23), (t, k), jnp.float32, 0.1, 1.0)
  indices = jnp.argsort(jax.random.uniform(jax.random.key(24), (t, num_experts)),
                        axis=-1)[:, :k].astype(jnp.int32)
  cot = normal(25, (t, d))

  def loss(tables, bank_fn):
    return jnp.vdot(bank_fn(tables).astype(jnp.float32), cot)

  def want_fn(tables):
    if cast:  # the reference sees what the op sees
      tables = {n: a.astype(jnp.bfloat16).astype(jnp.float32) for n, a in tables.items()}
    return reference.atomic_experts(x, tables["up"], tables["down"], weights, indices, "silu")

  got_fn = lambda tables: bank.apply({"params": tables}, x, weights, indices)
  table_casts = [e for e in jax.make_jaxpr(got_fn)(tables).eqns
                 if e.primitive.name == "convert_element_type"
                 and e.invars[0].aval.shape == (num_experts, d)]
  assert len(table_casts) == (2 if cast else 0)
  (value, grads), (value_want, grads_want) = (
      jax.jit(jax.value_and_grad(lambda p: loss(p, f)))(tables) for f in (got_fn, want_fn))
  np.testing.assert_allclose(value, value_want, rtol=2e-2)
  for name in ("up", "down"):
    g, g_want = grads[name], grads_want[name]
    assert g.dtype == jnp.float32
    assert float(jnp.linalg.norm(g - g_want) / jnp.linalg.norm(g_want)) < 2e-2, name


@pytest.mark.parametrize("build,path,fan_in", [
    (lambda: layers.SharedMLP(512), ("gate_up", "kernel"), 256),
    (lambda: layers.SharedMLP(512), ("down", "kernel"), 512),
    (lambda: layers.CoarseMoE(8, 2, 0, 128, 0.0), ("w_gate_up",), 256),
    (lambda: layers.CoarseMoE(8, 2, 0, 128, 0.0), ("w_down",), 128),
    (lambda: Attention(4, 16, 1e4), ("qkv", "kernel"), 256),
])
def test_projections_start_at_their_fan_in_scale(build, path, fan_in):
  """Kernels that stack projections ((d, 2, F) gate and up, (d, 3, H, h) q, k, v) must
  draw each at fan-in d (LeCun), as separate kernels would, not at the stack's size."""
  module, x = build(), jnp.ones((2, 4, 256))
  kwargs = {"decode": False} if isinstance(module, Attention) else (
      {} if isinstance(module, layers.SharedMLP) else {"train": False})
  w = nn.unbox(module.init(jax.random.key(0), x, **kwargs)["params"])
  for name in path:
    w = w[name]
  np.testing.assert_allclose(np.std(w) * math.sqrt(fan_in), 1.0, rtol=0.05)


def test_coarse_moe_matches_per_token_loop():
  x = normal(8, (17, 24))
  e, k, h = 6, 2, 12
  layer = layers.CoarseMoE(e, k, 1, h, aux_loss_coef=0.3)
  variables = init(layer, x)
  p = nn.unbox(variables["params"])
  y, aux = run(layer, variables, x)
  probs = np.asarray(jax.nn.softmax(x @ p["router"]))
  expected = np.array(swiglu(x, p["shared_mlp"]))
  xs, w = np.asarray(x), jax.tree.map(np.asarray, p)
  counts = np.zeros(e)
  for t in range(x.shape[0]):
    for i in np.argsort(-probs[t])[:k]:
      gate = xs[t] @ w["w_gate_up"][i, :, 0]
      hid = gate / (1 + np.exp(-gate)) * (xs[t] @ w["w_gate_up"][i, :, 1])
      expected[t] += probs[t, i] * (hid @ w["w_down"][i])
      counts[i] += 1
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(aux["expert_load"], counts)
  balance = e * np.sum(counts / (17 * k) * probs.mean(0))
  np.testing.assert_allclose(aux["aux_loss"], 0.3 * balance, rtol=1e-5)
  entropy = -np.sum(probs * np.log(probs), axis=-1).mean()  # mean over tokens
  np.testing.assert_allclose(aux["router_entropy"], entropy, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_peer_matches_brute_force(impl):
  """Heads share the tables, so a token's heads repeat experts (asserted): the op must add
  the repeats (Pallas: interpreted on CPU, its dense path at these sizes)."""
  x = normal(10, (13, 24))
  n, k, heads, key_dim = 6, 4, 3, 10
  layer = layers.PEERLayer(n * n, k, heads, key_dim, "gelu", impl)
  variables = layer.init(jax.random.key(1), x, train=False)  # op by op: indices concrete
  p = nn.unbox(variables["params"])
  y, aux = run(layer, variables, x)
  expected = jnp.zeros_like(x)
  picked = []
  for head in range(heads):
    q = x @ p["query"][:, head]
    s1, s2 = q[:, :key_dim // 2] @ p["keys_x"], q[:, key_dim // 2:] @ p["keys_y"]
    full = (s1[:, :, None] + s2[:, None, :]).reshape(13, -1)
    scores, idx = jax.lax.top_k(full, k)
    picked.append(idx)
    expected += reference.atomic_experts(x, p["experts"]["up"], p["experts"]["down"],
                                         jax.nn.softmax(scores, -1), idx, "gelu")
  picked = np.concatenate(picked, axis=1)
  assert any(len(set(row)) < row.size for row in picked)  # repeats across heads
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  assert float(aux["expert_load"].sum()) == 13 * heads * k


# ----------------------------------------------------------------------------- the LM


@pytest.mark.parametrize("ffn", KINDS)
def test_lm_builds_runs_is_causal_differentiable_and_counted(ffn):
  cfg = tiny_model_config(ffn)
  model = build_model(cfg)
  batch, length = 3, 11
  tok = tokens(12, (batch, length))
  variables = init(model, tok)
  apply = jax.jit(lambda v, t: model.apply(v, t, train=False))
  logits, aux = apply(variables, tok)
  assert logits.shape == (batch, length, 61) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Causal: a change at position 7 leaves positions < 7 alone (eval: per-token routing).
  changed, _ = apply(variables, tok.at[:, 7].set((tok[:, 7] + 1) % 61))
  np.testing.assert_allclose(changed[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(changed[:, 7:], logits[:, 7:])

  def loss(prm, state):
    (out, aux), updated = model.apply({"params": prm, **state}, tok, train=True,
                                      mutable=["batch_stats"])
    logp = jax.nn.log_softmax(out)
    nll = -jnp.mean(jnp.take_along_axis(logp, tok[..., None], -1))
    return nll + aux["aux_loss"], (aux, updated)

  state = {c: v for c, v in variables.items() if c != "params"}
  grads, (aux, updated) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"], state)
  for path, g in jax.tree_util.tree_leaves_with_path(nn.unbox(grads)):
    assert np.all(np.isfinite(g)), path
  assert ("expert_load" in aux) == (ffn != "dense")
  if ffn == "dense":
    assert float(aux["router_entropy"]) == 0.0 and float(aux["aux_loss"]) == 0.0
  else:
    pairs = {"omnimoe": 5, "coarse_moe": 2, "peer": 3 * 4}[ffn] * batch * length
    np.testing.assert_array_equal(aux["expert_load"].sum(axis=1), [pairs] * cfg.n_layers)
    assert aux["expert_load"].shape == (cfg.n_layers, cfg[ffn].num_experts)
    assert 0 < float(aux["router_entropy"]) <= math.log(cfg[ffn].num_experts)
  if ffn == "omnimoe":  # BatchNorm running statistics moved
    stats = lambda v: v["batch_stats"]["block_1"]["ffn"]["router"]["norm_y"]["var"]
    assert not np.allclose(stats(variables), stats(updated))

  # count_params (from shapes) against the real parameters.
  actual = sum(int(np.size(a)) for a in jax.tree.leaves(nn.unbox(variables["params"])))
  counts = params.count_params(cfg)
  assert counts["total"] == actual
  assert counts["active_non_embedding"] == counts["active"] - 61 * 24
  experts = counts["by_part"].get("experts", {"total": 0, "active": 0})
  d, n_layers = 24, cfg.n_layers
  assert experts["active"] == {"dense": 0, "omnimoe": n_layers * 5 * 2 * d,
                               "peer": n_layers * 3 * 4 * 2 * d,
                               "coarse_moe": n_layers * 2 * 3 * d * 12}[ffn]
  assert counts["total"] - counts["active"] == experts["total"] - experts["active"]


@pytest.mark.parametrize("ffn", KINDS)
def test_kv_cache_decode_equals_full_forward(ffn):
  cfg = tiny_model_config(ffn)
  model = build_model(cfg)
  tok = tokens(16, (2, 10))
  variables = init(model, tok)
  full, _ = jax.jit(lambda t: model.apply(variables, t, train=False))(tok)

  @jax.jit
  def step(cache, t):
    (logits, _), new = model.apply({**variables, "cache": cache}, t, train=False, decode=True,
                                   mutable=["cache"])
    return logits, new["cache"]

  prefill = 6
  (logits, _), cache = jax.jit(lambda t: model.apply(variables, t, train=False, decode=True,
                                                     mutable=["cache"]))(tok[:, :prefill])
  cache = cache["cache"]
  pieces = [logits]
  for i in range(prefill, tok.shape[1]):
    logits, cache = step(cache, tok[:, i:i + 1])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)
  assert int(cache["block_0"]["attn"]["cache_index"]) == tok.shape[1]
  assert cache["block_0"]["attn"]["cached_key"].shape == (2, cfg.max_len, 3, 8)


def test_bfloat16_compute_gives_float32_logits():
  cfg = tiny_model_config("omnimoe")
  cfg.dtype, cfg.n_layers = "bfloat16", 1
  model = build_model(cfg)
  tok = tokens(18, (2, 7))
  variables = init(model, tok)
  assert jax.tree.leaves(nn.unbox(variables["params"]))[0].dtype == jnp.float32
  logits, _ = jax.jit(lambda v: model.apply(v, tok, train=False))(variables)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_hot_embedding_gradient_equals_the_scatter(dtype):
  """Same rows, same table gradient; tokens repeat heavily (3 ids hold most of the batch)."""
  ids = jax.random.choice(jax.random.key(3), 37, (5, 29), p=jnp.arange(37.0) ** 4)
  dy = normal(4, (5, 29, 24)).astype(dtype)
  out = {}
  for grad in ("one_hot", "scatter"):
    module = TokenEmbedding(37, 24, grad, dtype=dtype)
    variables = jax.jit(module.init)(jax.random.key(0), ids)
    loss = lambda v, m=module: jnp.sum(m.apply(v, ids).astype(jnp.float32) * dy)
    rows = jax.jit(module.apply)(variables, ids)
    out[grad] = rows, jax.jit(jax.grad(loss))(variables)["params"]["embedding"].value
  assert out["one_hot"][0].dtype == dtype
  np.testing.assert_array_equal(out["one_hot"][0], out["scatter"][0])
  # float32 sums in either order; the bf16 scatter rounds every partial sum to bf16.
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(out["one_hot"][1], out["scatter"][1], **tol)
  assert np.abs(out["one_hot"][1]).max() > 10  # the hot rows did get the many adds


def test_attention_impl_auto_is_xla_off_gpu_and_cudnn_needs_bf16():
  on_gpu = jax.default_backend() == "gpu"
  assert attention_impl("auto", jnp.bfloat16, 64, 128) == ("cudnn" if on_gpu else "xla")
  assert attention_impl("auto", jnp.float32, 64, 128) == "xla"
  assert attention_impl("auto", jnp.bfloat16, 12, 128) == "xla"
  assert attention_impl("auto", jnp.bfloat16, 64, 127) == "xla"  # cuDNN refuses odd L
  assert attention_impl("xla", jnp.bfloat16, 64, 127) == "xla"
  with pytest.raises(ValueError, match="model.attention='cudnn' needs .* length 127"):
    attention_impl("cudnn", jnp.bfloat16, 64, 127)
  if not on_gpu:
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
      attention_impl("cudnn", jnp.bfloat16, 64, 128)
  cfg = tiny_model_config()
  cfg.attention = "cudnn"
  with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn': needs model.dtype"):
    build_model(cfg)
  cfg.attention, cfg.embed_grad = "auto", "gather"
  with pytest.raises(config_lib.ConfigError, match="model.embed_grad='gather'"):
    build_model(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_attention_matches_xla_on_gpu():
  """cuDNN's fused attention (what 'auto' takes on GPU) against XLA's, in a bf16 LM:
  logits and every parameter gradient, on a sequence longer than one 64-row tile (and
  even: cuDNN's causal training kernel refuses odd lengths, where 'auto' takes XLA)."""
  cfg = tiny_model_config("dense")
  cfg.dtype, cfg.d_model, cfg.n_heads, cfg.max_len = "bfloat16", 64, 4, 96
  tok = tokens(5, (3, 82))
  cot = normal(6, (3, 82, cfg.vocab_size))
  out = {}
  for impl in ("xla", "cudnn"):
    cfg.attention = impl
    model = build_model(cfg)
    variables = init(model, tok)
    loss = lambda v, m=model: jnp.sum(m.apply(v, tok, train=False)[0] * cot)
    out[impl] = (run(model, variables, tok)[0], jax.jit(jax.grad(loss))(variables)["params"])
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(out["cudnn"][0], out["xla"][0]) < 2e-2
  for got, want in zip(jax.tree.leaves(nn.unbox(out["cudnn"][1])),
                       jax.tree.leaves(nn.unbox(out["xla"][1]))):
    assert rel(got, want) < 5e-2


def test_too_long_input_and_bad_config_are_refused():
  cfg = tiny_model_config()
  with pytest.raises(ValueError, match="max_len"):
    build_model(cfg).init(jax.random.key(0), tokens(0, (1, 17)), train=False)
  cfg.omnimoe.num_experts = 50
  with pytest.raises(config_lib.ConfigError, match="model.omnimoe.num_experts=50"):
    build_model(cfg)


def test_every_parameter_has_logical_names():
  variables = jax.eval_shape(
      lambda: build_model(tiny_model_config("omnimoe")).init(
          jax.random.key(0), tokens(0, (1, 4)), train=False))
  boxed = jax.tree.leaves(variables["params"],
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == len(b.value.shape), b


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize("ffn", ["dense", "coarse_moe", "peer"])
def test_match_active(ffn):
  cfg = tiny_model_config("omnimoe")
  target = params.count_params(cfg)["active_non_embedding"]
  matched = params.match_active(cfg, ffn)
  got = params.count_params(matched)["active_non_embedding"]
  assert matched.ffn == ffn
  # Within one step of the solved size (e.g. one PEER head: d * key_dim + k * 2 * d).
  assert abs(got - target) <= 24 * 10 + 4 * 2 * 24, (got, target)


def test_swiglu_experts_add_a_counted_gate_table():
  """activation='swiglu' (the paper's wording) adds a third (N, d) table per layer."""
  silu_cfg, swiglu_cfg = tiny_model_config(), tiny_model_config(activation="swiglu")
  extra = params.count_params(swiglu_cfg)["total"] - params.count_params(silu_cfg)["total"]
  assert extra == swiglu_cfg.n_layers * 49 * 24
  model = build_model(swiglu_cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 61)
  variables = model.init(jax.random.key(1), tokens, train=False)
  logits, _ = model.apply(variables, tokens, train=False)
  assert np.isfinite(np.asarray(logits)).all()


# ----------------------------------------------------------------------------- paper vs code


def test_omnimoe_defaults_are_the_released_codes_switches():
  c = config_lib.model_config().omnimoe
  assert (c.activation, c.routing_weights, c.router_norm) == ("silu", "exp", "batchnorm")


@pytest.mark.parametrize("paper", [False, True], ids=["code-defaults", "paper-switches"])
def test_paper_and_code_switches_through_build_model(paper):
  """The paper's switches (softmax over the k kept, no router norm, swiglu experts) set
  through the config: no BatchNorm state, a third (N, d) expert table, routing weights of
  each token summing to 1; the defaults: batch_stats and weights exp(score) (sum < 1).
  Either way one training forward + grad of the LM runs (its intermediates are read)."""
  switches = dict(routing_weights="softmax", router_norm="none", activation="swiglu")
  cfg = tiny_model_config(**(switches if paper else {}))
  cfg.n_layers = 1
  model = build_model(cfg)
  tok = tokens(30, (3, 9))
  variables = init(model, tok)
  assert ("batch_stats" in variables) == (not paper)
  bank = variables["params"]["block_0"]["ffn"]["experts"]
  assert sorted(bank) == (["down", "gate", "up"] if paper else ["down", "up"])
  if paper:
    assert bank["gate"].value.shape == (49, 24)
    assert bank["gate"].names == ("experts", "expert_embed")

  # Intermediates: the router's outputs and its input (the ffn_norm output).
  probe = lambda mdl, _: isinstance(mdl, router_lib.CartesianRouter) or mdl.name == "ffn_norm"

  def loss(prm, state):
    (out, aux), updated = model.apply({"params": prm, **state}, tok, train=True,
                                      capture_intermediates=probe,
                                      mutable=["batch_stats", "intermediates"])
    logp = jax.nn.log_softmax(out)
    nll = -jnp.mean(jnp.take_along_axis(logp, tok[..., None], -1))
    return nll + aux["aux_loss"], updated

  state = {c: v for c, v in variables.items() if c != "params"}
  (value, updated), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"], state)
  assert np.isfinite(float(value)) and ("batch_stats" in updated) == (not paper)
  grads = nn.unbox(grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
  ffn_grads = grads["block_0"]["ffn"]
  for g in (ffn_grads["router"]["gate_x"], ffn_grads["router"]["gate_y"],
            *ffn_grads["experts"].values()):  # the gradient reaches the gates and tables
    assert np.any(np.asarray(g) != 0)

  inter = updated["intermediates"]["block_0"]
  w, idx, _ = inter["ffn"]["router"]["__call__"][0]
  x = inter["ffn_norm"]["__call__"][0].reshape(-1, 24)
  assert w.shape == (27, 5)
  gates = nn.unbox(variables["params"])["block_0"]["ffn"]["router"]
  if paper:
    mean = var = None
  else:  # training: BatchNorm with the batch's statistics (biased variance)
    mean = {a: jnp.mean(x @ gates[f"gate_{a}"], 0) for a in "xy"}
    var = {a: jnp.var(x @ gates[f"gate_{a}"], 0) for a in "xy"}
  w_ref, idx_ref, _, _ = brute_force_route(x, gates, 7, 5, "softmax" if paper else "exp",
                                           mean, var)
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-6)
  sums = np.asarray(w.sum(-1))
  if paper:
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
  else:  # exp(score) = p_x(i) p_y(j): not normalised
    assert np.all(sums < 0.99) and np.all(sums > 0), sums


def _rms(x, scale):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale


def _rotate(x, positions, base):
  """RoPE as a complex rotation: pair j of the halves (x1_j, x2_j) is the number
  x1_j + i x2_j, turned by the angle position * base^(-j / half)."""
  half = x.shape[-1] // 2
  angles = positions[:, None] * base ** (-np.arange(half) / half)  # (L, half)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)[:, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def test_lm_matches_a_hand_written_forward():
  """The dense LM against numpy in float64, written from the architecture (pre-norm blocks
  of causal RoPE attention and a SwiGLU FFN, each read from the RMS-normed residual stream
  and added to it; a final RMSNorm; the output projection) with the model's parameters:
  pins what causality, caching and shape checks cannot."""
  cfg = tiny_model_config("dense")
  model = build_model(cfg)
  ids = tokens(20, (2, 11))
  variables = init(model, ids)
  logits, _ = run(model, variables, ids)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
  head_dim = cfg.d_model // cfg.n_heads
  positions = np.arange(ids.shape[1], dtype=np.float64)
  causal = np.tril(np.ones((ids.shape[1], ids.shape[1]), bool))
  x = p["embed"]["embedding"][np.asarray(ids)]
  for layer in range(cfg.n_layers):
    block = p[f"block_{layer}"]
    h = _rms(x, block["attn_norm"]["scale"])
    qkv = np.einsum("bld,dchk->bclhk", h, block["attn"]["qkv"]["kernel"])
    q, k = (_rotate(qkv[:, i], positions, cfg.rope_base) for i in range(2))
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(head_dim)
    scores = np.where(causal, scores, -np.inf)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", attn, qkv[:, 2])
    x = x + np.einsum("bqhk,hkd->bqd", out, block["attn"]["out"]["kernel"])
    h = _rms(x, block["ffn_norm"]["scale"])
    mlp = block["ffn"]["mlp"]
    gate = h @ mlp["gate_up"]["kernel"][:, 0]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ mlp["gate_up"]["kernel"][:, 1])
             ) @ mlp["down"]["kernel"]
  want = _rms(x, p["final_norm"]["scale"]) @ p["output"]["kernel"]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_lm_aux_loss_is_the_sum_over_its_layers():
  cfg = tiny_model_config("coarse_moe")
  model = build_model(cfg)
  ids = tokens(21, (2, 9))
  variables = init(model, ids)
  (_, aux), state = jax.jit(lambda v, t: model.apply(
      v, t, train=False, capture_intermediates=lambda m, _: isinstance(m, layers.CoarseMoE),
      mutable=["intermediates"]))(variables, ids)
  per_layer = [state["intermediates"][f"block_{i}"]["ffn"]["__call__"][0][1]["aux_loss"]
               for i in range(cfg.n_layers)]
  assert cfg.n_layers == 2 and all(float(a) > 0 for a in per_layer)
  np.testing.assert_allclose(aux["aux_loss"], sum(per_layer), rtol=1e-6)
