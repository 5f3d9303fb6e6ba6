"""Experiment config: defaults for every model field, and validation before anything compiles.

An experiment config is an `ml_collections.ConfigDict` with a `model` section (defined and
checked here) and `train`, `data`, `mesh`, `checkpoint` sections (placeholders here; the
trainer owns their meaning and checks: `omnimoe.train.validate`). Every field has a concrete
default of the right type in `base_config()`, so that any of them can be overridden from the
command line (`--config.a.b=value`).
"""
from __future__ import annotations

import math

import ml_collections

from omnimoe import reference

FFN_KINDS = ("dense", "coarse_moe", "peer", "omnimoe")
DTYPES = ("float32", "bfloat16")
ROUTING_WEIGHTS = ("exp", "softmax")
ROUTER_NORMS = ("batchnorm", "none")
EMBED_GRADS = ("auto", "one_hot", "scatter")
ATTENTIONS = ("auto", "xla", "cudnn")
IMPL_SETTINGS = ("auto", "xla", "pallas")  # 'auto' is `omnimoe.ops`' None


class ConfigError(ValueError):
  """A config field breaks a rule; the message names the field path and the rule."""


def model_config() -> ml_collections.ConfigDict:
  """Defaults for `config.model`: a small byte-level OmniMoE LM (the released code's switches).

  The released code's choices are the defaults: routing weights exp(score) (not
  renormalised), BatchNorm on the router logits, silu on the scalar expert score. The
  paper's variant is `routing_weights='softmax'`, `router_norm='none'`.
  """
  m = ml_collections.ConfigDict()
  m.vocab_size = 256
  m.d_model = 64
  m.n_layers = 2
  m.n_heads = 4
  m.max_len = 128
  m.rope_base = 10000.0
  m.dtype = "float32"  # compute dtype
  m.param_dtype = "float32"
  m.ffn = "omnimoe"  # one of FFN_KINDS
  m.attention = "auto"  # 'cudnn' (flash) | 'xla'; auto: cudnn on GPU for bf16 compute
  m.embed_grad = "auto"  # 'one_hot' (a GEMM) | 'scatter'; auto: one_hot for small vocabs

  m.dense = ml_collections.ConfigDict()
  m.dense.ffn_dim = 256

  m.omnimoe = ml_collections.ConfigDict()
  m.omnimoe.num_experts = 256  # N = n * n atomic experts
  m.omnimoe.top_k = 8
  m.omnimoe.shared_ffn_dim = 128  # width F of the shared SwiGLU MLP
  # The paper and the released code differ (DESIGN.md section 1); defaults are the code's.
  m.omnimoe.activation = "silu"  # silu of <x, u_e> (code) | 'swiglu': third table (paper)
  m.omnimoe.routing_weights = "exp"  # exp(score) (code) | 'softmax' over the k kept (paper)
  m.omnimoe.router_norm = "batchnorm"  # BatchNorm, no affine (code) | 'none' (paper)
  m.omnimoe.impl = "auto"  # 'auto': Pallas on GPU, XLA elsewhere

  m.coarse_moe = ml_collections.ConfigDict()
  m.coarse_moe.num_experts = 16  # routed experts
  m.coarse_moe.top_k = 2
  m.coarse_moe.num_shared = 1  # always-on experts
  m.coarse_moe.expert_dim = 64
  m.coarse_moe.aux_loss_coef = 0.01

  m.peer = ml_collections.ConfigDict()
  m.peer.num_experts = 256  # N = n * n single-neuron experts
  m.peer.top_k = 16  # per head, as in PEER
  m.peer.num_heads = 4
  m.peer.key_dim = 32  # query width; each half searches one sub-key table
  m.peer.activation = "gelu"
  m.peer.impl = "auto"
  return m


def base_config() -> ml_collections.ConfigDict:
  """A full experiment config: `model_config()` plus the trainer's sections.

  The `train`, `data`, `mesh`, `checkpoint` fields are placeholders with tiny-run values;
  config files override them.
  """
  config = ml_collections.ConfigDict()
  config.model = model_config()

  config.train = ml_collections.ConfigDict()
  config.train.steps = 100
  config.train.batch_size = 8
  config.train.seq_len = 32
  config.train.lr = 3e-3
  config.train.warmup_steps = 10
  config.train.weight_decay = 0.1
  config.train.expert_lr_scale = 1.0  # learning-rate factor of the atomic expert tables
  config.train.grad_clip = 1.0
  config.train.z_loss = 1e-4
  config.train.seed = 0
  config.train.log_every = 10
  config.train.eval_every = 50
  config.train.eval_steps = 4
  config.train.profile_start = 0  # first step of a profiler trace to workdir/profile (0: none)
  config.train.profile_steps = 5  # steps the trace covers
  config.train.debug_nan_step = -1  # testing hook: poison this step's loss (-1: off)

  config.data = ml_collections.ConfigDict()
  config.data.source = "builtin"
  config.data.path = ""
  config.data.val_fraction = 0.05
  config.data.workers = 0  # grain worker processes (0: load in the training process)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100
  config.checkpoint.keep = 3
  return config


def fail(field: str, value, rule: str) -> None:
  """Raises ConfigError naming the full field path (e.g. 'train.steps'), value and rule."""
  raise ConfigError(f"{field}={value!r}: {rule}")


def check(ok: bool, field: str, value, rule: str) -> None:
  if not ok:
    fail(field, value, rule)


def check_int(value, field: str, lo: int = 1, hi: int | None = None, hi_name: str = "") -> int:
  """Checks that `value` is an int in [lo, hi]; returns it."""
  check(isinstance(value, int) and not isinstance(value, bool), field, value,
        "must be an integer")
  check(value >= lo, field, value, f"must be >= {lo}")
  check(hi is None or value <= hi, field, value, f"must be <= {hi_name} = {hi}")
  return value


def check_number(value, field: str, positive: bool) -> None:
  """Checks that `value` is a finite number, > 0 (positive) or >= 0."""
  check(isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value), field, value, "must be a finite number")
  check(value > 0 if positive else value >= 0, field, value,
        "must be > 0" if positive else "must be >= 0")


def _fail(path: str, value, rule: str) -> None:
  fail(f"model.{path}", value, rule)


def field(config, path: str, prefix: str = ""):
  """The value at dotted `path` (e.g. 'train.steps'); a missing one is a ConfigError naming
  `prefix + path`."""
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"{prefix}{path}: missing field")
    node = node[part]
  return node


def _get(cfg, path: str):
  return field(cfg, path, "model.")


def _int(cfg, path: str, lo: int = 1, hi: int | None = None, hi_name: str = "") -> int:
  """Checks that model field `path` is an int in [lo, hi]; returns it."""
  return check_int(_get(cfg, path), f"model.{path}", lo, hi, hi_name)


def _choice(cfg, path: str, choices) -> str:
  value = _get(cfg, path)
  if value not in choices:
    _fail(path, value, f"must be one of {sorted(choices)}")
  return value


def _square_experts(cfg, section: str) -> int:
  """The Cartesian grid needs N = n * n; returns N."""
  n = _int(cfg, f"{section}.num_experts")
  if math.isqrt(n) ** 2 != n:
    _fail(f"{section}.num_experts", n, "must be a perfect square (n*n)")
  return n


def _activation_and_impl(cfg, section: str) -> None:
  """The expert activation and op implementation of an atomic-expert section. The impl
  None is accepted for callers that build configs in Python ('auto' is its spelling);
  'swiglu' (a third table) has no Pallas kernels, so 'auto' runs it on XLA."""
  activation = _choice(cfg, f"{section}.activation", reference.EXPERT_ACTIVATIONS)
  impl = _get(cfg, f"{section}.impl")
  if impl is not None:
    _choice(cfg, f"{section}.impl", IMPL_SETTINGS)
  if activation == "swiglu" and impl == "pallas":
    _fail(f"{section}.impl", impl, "the Pallas kernels cover the scalar activations; use "
          f"'auto' or 'xla' with model.{section}.activation='swiglu'")


def validate_model(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first `model.*` field that breaks a rule.

  Only the section of the chosen `ffn` kind is checked, so other kinds' sections may hold
  anything.
  """
  for path in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
    _int(cfg, path)
  d, heads = cfg.d_model, cfg.n_heads
  if d % heads:
    _fail("d_model", d, f"must be divisible by model.n_heads = {heads}")
  if (d // heads) % 2:
    _fail("n_heads", heads, f"head_dim = d_model / n_heads = {d // heads} must be even (RoPE)")
  check_number(_get(cfg, "rope_base"), "model.rope_base", positive=True)
  if cfg.rope_base <= 1:
    _fail("rope_base", cfg.rope_base, "must be > 1")
  _choice(cfg, "dtype", DTYPES)
  _choice(cfg, "param_dtype", DTYPES)
  _choice(cfg, "embed_grad", EMBED_GRADS)
  if _choice(cfg, "attention", ATTENTIONS) == "cudnn":
    head_dim = d // heads
    if cfg.dtype != "bfloat16":
      _fail("attention", "cudnn", f"needs model.dtype = 'bfloat16', got {cfg.dtype!r}")
    if head_dim % 8 or head_dim > 128:
      _fail("attention", "cudnn", f"needs head_dim = d_model / n_heads a multiple of 8 up "
            f"to 128, got {head_dim}")
  ffn = _choice(cfg, "ffn", FFN_KINDS)

  if ffn == "dense":
    _int(cfg, "dense.ffn_dim")
  elif ffn == "omnimoe":
    n = _square_experts(cfg, "omnimoe")
    _int(cfg, "omnimoe.top_k", 1, n, "model.omnimoe.num_experts")
    _int(cfg, "omnimoe.shared_ffn_dim")
    _choice(cfg, "omnimoe.routing_weights", ROUTING_WEIGHTS)
    _choice(cfg, "omnimoe.router_norm", ROUTER_NORMS)
    _activation_and_impl(cfg, "omnimoe")
  elif ffn == "coarse_moe":
    e = _int(cfg, "coarse_moe.num_experts")
    _int(cfg, "coarse_moe.top_k", 1, e, "model.coarse_moe.num_experts")
    _int(cfg, "coarse_moe.num_shared", lo=0)
    _int(cfg, "coarse_moe.expert_dim")
    check_number(cfg.coarse_moe.aux_loss_coef, "model.coarse_moe.aux_loss_coef", positive=False)
  else:  # peer
    n = _square_experts(cfg, "peer")
    _int(cfg, "peer.top_k", 1, n, "model.peer.num_experts")
    _int(cfg, "peer.num_heads")
    if _int(cfg, "peer.key_dim") % 2:
      _fail("peer.key_dim", cfg.peer.key_dim, "must be even (two halves, one per sub-key table)")
    _activation_and_impl(cfg, "peer")


def resolve_impl(impl: str | None) -> str | None:
  """Config spelling to `omnimoe.ops` spelling: 'auto' (or None) -> None."""
  return None if impl in (None, "auto") else impl
