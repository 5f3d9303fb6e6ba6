"""Parameter counts from shapes alone, and configs of equal active parameters.

Conventions: 'embedding' is the input token-embedding table only, counted in `total` and
`active` and left out of `active_non_embedding` (a lookup costs no FLOPs). The untied output
projection is a matmul every token pays for, so it is counted everywhere ('output').
Active parameters are those one token touches in one forward pass:
  dense       all;
  omnimoe     shared MLP + router gates + k rows of U and of V (k * 2 * d) per layer;
  coarse_moe  shared experts + top_k of the routed experts + the router;
  peer        query projections + sub-keys + min(heads * k, N) rows of U and V per layer;
attention, norms and output always.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
from flax import traverse_util

from omnimoe import model as model_lib

# FFN parameter names -> part. Every other FFN parameter belongs to an MLP ('mlp').
_FFN_PARTS = {"experts": "experts", "w_gate_up": "experts", "w_down": "experts",
              "router": "router", "query": "router", "keys_x": "router", "keys_y": "router"}

# The size that `match_active` solves for, per FFN kind.
MATCH_FIELD = {"dense": "dense.ffn_dim", "omnimoe": "omnimoe.shared_ffn_dim",
               "coarse_moe": "coarse_moe.expert_dim", "peer": "peer.num_heads"}


def param_shapes(model_cfg: ml_collections.ConfigDict) -> dict:
  """Flat {path tuple: ShapeDtypeStruct} of the model's parameters, without allocating."""
  model = model_lib.build_model(model_cfg)
  tokens = jnp.zeros((1, 2), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, train=False))
  return traverse_util.flatten_dict(nn.unbox(variables["params"]))


def _part(path: tuple) -> str:
  if path[0] in ("embed", "output"):
    return {"embed": "embedding", "output": "output"}[path[0]]
  if path[0].endswith("norm") or path[1].endswith("norm"):
    return "norm"
  if path[1] == "attn":
    return "attention"
  return _FFN_PARTS.get(path[2], "mlp")  # path = (block_i, 'ffn', name, ...)


def _active_expert_fraction(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(rows touched per token, rows) of the routed-expert weights of the FFN kind."""
  if cfg.ffn == "omnimoe":
    return cfg.omnimoe.top_k, cfg.omnimoe.num_experts
  if cfg.ffn == "coarse_moe":
    return cfg.coarse_moe.top_k, cfg.coarse_moe.num_experts
  if cfg.ffn == "peer":
    return min(cfg.peer.num_heads * cfg.peer.top_k, cfg.peer.num_experts), cfg.peer.num_experts
  return 1, 1


def count_params(model_cfg: ml_collections.ConfigDict) -> dict:
  """Total and active parameter counts (see the module docstring for the conventions).

  Returns dict(total, active, active_non_embedding, by_part={part: {'total', 'active'}}),
  parts: embedding, attention, norm, mlp (shared/dense SwiGLU), router, experts, output.
  """
  used, rows = _active_expert_fraction(model_cfg)
  by_part = {}
  for path, leaf in param_shapes(model_cfg).items():
    part = _part(path)
    size = int(leaf.size)
    entry = by_part.setdefault(part, {"total": 0, "active": 0})
    entry["total"] += size
    entry["active"] += size * used // rows if part == "experts" else size
  total = sum(p["total"] for p in by_part.values())
  active = sum(p["active"] for p in by_part.values())
  return dict(total=total, active=active,
              active_non_embedding=active - by_part["embedding"]["active"], by_part=by_part)


def match_active(model_cfg: ml_collections.ConfigDict, ffn: str, multiple: int = 1
                 ) -> ml_collections.ConfigDict:
  """A copy of `model_cfg` with FFN kind `ffn`, sized to its active non-embedding count.

  The size solved for is `MATCH_FIELD[ffn]` (dense width, shared-MLP width, coarse expert
  width, PEER heads); the other fields of that kind's section are kept. Active counts
  are affine in that size (for PEER while heads * k <= N), so two counts give the exact
  solution, rounded to an integer; widths (`*_dim`) to the nearest positive multiple of
  `multiple` (e.g. 64, for matmul-friendly shapes on a GPU).
  """
  target = count_params(model_cfg)["active_non_embedding"]
  out = ml_collections.ConfigDict(model_cfg.to_dict())
  out.ffn = ffn
  section, field = MATCH_FIELD[ffn].split(".")

  def active_at(size):
    out[section][field] = size
    return count_params(out)["active_non_embedding"]

  base = active_at(1)
  slope = active_at(2) - base
  step = multiple if field.endswith("_dim") else 1
  out[section][field] = max(step, step * round((1 + (target - base) / slope) / step))
  return out


def ffn_variant(config: ml_collections.ConfigDict, arg: str | None, multiple: int = 1
                ) -> ml_collections.ConfigDict:
  """Config files' `get_config(arg)`: arg names an FFN kind to switch to at equal active
  parameters (`match_active`); None, '' or the config's own kind leaves it as is."""
  if arg and arg != config.model.ffn:
    if arg not in MATCH_FIELD:
      raise ValueError(f"config arg must be one of {sorted(MATCH_FIELD)}, got {arg!r}")
    config.model = match_active(config.model, arg, multiple)
  return config
