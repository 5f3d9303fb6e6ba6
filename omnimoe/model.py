"""Decoder-only language model with a configurable FFN (dense, coarse MoE, PEER, OmniMoE).

  (logits, aux), updates = model.apply(variables, tokens, train=True,
                                       mutable=['batch_stats'])                     # train
  logits, aux = model.apply(variables, tokens, train=False)                         # eval
  (logits, aux), cache = model.apply(variables, prompt, train=False, decode=True,
                                     mutable=['cache'])                             # prefill
  (then feed one token at a time with {**variables, **cache})

Blocks are pre-norm: `h = x + Attn(RMSNorm(x))`, `x' = h + FFN(RMSNorm(h))`; causal
multi-head attention with rotary position embeddings (rotate-half convention). The output
projection is untied from the token embedding (the paper's LMs and most MoE LMs untie it; it
also keeps the embedding a pure lookup for the active-parameter count). Compute runs in
`model.dtype`, parameters are stored in `model.param_dtype`, logits are returned as float32
(computed in `model.dtype`, as the other projections: with bf16 compute they carry bf16
rounding, which the float32 loss then sees).

aux = {'aux_loss': scalar float32, summed over layers (0.0 unless coarse_moe);
       'router_entropy': scalar float32, mean over routed layers (0.0 for dense);
       'expert_load': (n_layers, N) float32 pairs routed to each expert per layer
                      (absent for dense)}.

Logical axis names of the parameters (`nn.with_logical_partitioning`; mapped to mesh
axes by `omnimoe.sharding`):
  'vocab'         vocabulary axis of the embedding and of the output projection
  'embed'         the model width d
  'mlp'           hidden width of SwiGLU MLPs (shared MLP, dense FFN, coarse-MoE experts)
  'heads'         attention heads (and PEER query heads)
  'head_dim'      per-head width (attention heads, PEER query/sub-key width)
  'experts'       rows (N) of the atomic-expert tables U, V (OmniMoE and PEER)
  'expert_embed'  the d axis of U, V
  'router'        output axis of router gates (the n axis of the Cartesian gates and PEER
                  sub-keys, the expert axis of the coarse-MoE gate)
  'moe_experts'   the expert axis of coarse-MoE expert weights
  'norm'          RMSNorm scales
BatchNorm running statistics (collection 'batch_stats', (n,) per router axis) and the KV
cache carry no names.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from omnimoe import config as config_lib
from omnimoe import layers


def _rms_norm(dtype, param_dtype, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding of x (B, L, H, D) at integer positions (L,), rotate-half convention."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freq  # (L, half)
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ONE_HOT_MAX_VOCAB = 4096  # embed_grad='auto' builds the table gradient as a GEMM up to here


def _take_rows(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
  """table[tokens] in dtype (autodiff: a scatter-add into the table)."""
  return jnp.take(table.astype(dtype), tokens, axis=0)


# The same rows, whose table gradient is a GEMM, onehot(tokens)^T dy.
_lookup = jax.custom_vjp(_take_rows, nondiff_argnums=(2,))


def _lookup_fwd(table, tokens, dtype):
  return _lookup(table, tokens, dtype), (table, tokens)  # the table only for shape, dtype


def _lookup_bwd(dtype, residual, dy):
  del dtype
  table, tokens = residual
  one_hot = jax.nn.one_hot(tokens.reshape(-1), table.shape[0], dtype=dy.dtype)
  dtable = jnp.einsum("nv,nd->vd", one_hot, dy.reshape(-1, dy.shape[-1]),
                      preferred_element_type=jnp.float32)
  return dtable.astype(table.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class TokenEmbedding(nn.Module):
  """tokens (...) int32 -> (..., d) rows of the (V, d) table 'embedding', in `dtype`.

  The backward of a lookup adds B L rows of dy into V table rows. XLA does that with a
  scatter-add, whose adds collide where tokens repeat: with bytes (V = 256) a 16k-token
  batch of text lands thousands of adds on the rows of ' ' and 'e'. `grad='one_hot'` builds
  the table gradient as one GEMM, onehot(tokens)^T dy (2 V B L d flops, float32
  accumulation, no atomics, deterministic); 'scatter' is XLA's autodiff; 'auto' picks
  one_hot for V <= ONE_HOT_MAX_VOCAB. Whatever V, the GEMM adds a third of the output
  projection's flops (2 of its 6 V B L d) and a (B L, V) one-hot operand: small change
  for small vocabularies, where repeats pile up; large vocabularies repeat less and keep
  the scatter. Measured: experiments/RESULTS.md ("Training throughput").
  """
  vocab_size: int
  features: int
  grad: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.vocab_size, self.features), self.param_dtype)
    grad = self.grad
    if grad == "auto":
      grad = "one_hot" if self.vocab_size <= ONE_HOT_MAX_VOCAB else "scatter"
    rows = _lookup if grad == "one_hot" else _take_rows
    return rows(table, tokens, jnp.dtype(self.dtype))


def attention_impl(setting: str, dtype, head_dim: int, length: int) -> str:
  """'xla' or 'cudnn' for `jax.nn.dot_product_attention` in training and evaluation.

  'cudnn' is the fused flash kernel (no (B, H, L, L) scores in memory); `auto` takes it on a
  GPU backend for the shapes it supports (bf16, head widths a multiple of 8 up to 128,
  even sequence lengths: cuDNN's causal training kernel refuses odd ones, seen on an
  H200 with JAX 0.11.2), else XLA's unfused softmax(q k^T) v. An explicit 'cudnn' that
  cannot run (no GPU, or shapes it refuses) is refused here, naming the field.
  """
  fits = (jax.default_backend() == "gpu" and jnp.dtype(dtype) == jnp.bfloat16
          and head_dim % 8 == 0 and head_dim <= 128 and length % 2 == 0)
  if setting == "cudnn" and not fits:
    raise ValueError(f"model.attention='cudnn' needs a GPU, bf16, head_dim a multiple of 8 "
                     f"up to 128 and an even sequence length; got {jax.default_backend()}, "
                     f"{jnp.dtype(dtype).name}, head_dim {head_dim}, length {length}")
  if setting != "auto":
    return setting
  return "cudnn" if fits else "xla"


class Attention(nn.Module):
  """Causal multi-head self-attention with RoPE and an optional KV cache.

  With `decode=True` the keys and values are written into collection 'cache'
  (cached_key, cached_value: (B, max_len, H, head_dim); cache_index: scalar int32), created
  on first use, and the queries attend to every cached position up to their own. So one
  call can prefill a prompt and later calls feed one token at a time. Positions beyond
  max_len are not checked under jit (dynamic_update_slice would clamp them).
  """
  n_heads: int
  max_len: int
  rope_base: float
  impl: str = "auto"  # see `attention_impl`; the cached (decode) path always runs XLA's
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, decode: bool) -> jax.Array:
    batch, length, d = x.shape
    head_dim = d // self.n_heads
    init = nn.initializers.lecun_normal()

    # q, k and v as one parameter: one GEMM, no concatenation (see layers.SharedMLP)
    qkv = nn.DenseGeneral((3, self.n_heads, head_dim), use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="qkv",
                          kernel_init=nn.with_logical_partitioning(
                              init, ("embed", None, "heads", "head_dim")))(x)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    if decode:
      cache_shape = (batch, self.max_len, self.n_heads, head_dim)
      cached_key = self.variable("cache", "cached_key", jnp.zeros, cache_shape, self.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, cache_shape, self.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      start = cache_index.value
      positions = start + jnp.arange(length)
      q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
      at = (0, start, 0, 0)
      cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(self.dtype), at)
      cached_value.value = jax.lax.dynamic_update_slice(cached_value.value,
                                                        v.astype(self.dtype), at)
      cache_index.value = start + length
      mask = jnp.arange(self.max_len)[None, :] <= positions[:, None]  # (L, max_len)
      out = jax.nn.dot_product_attention(q, cached_key.value, cached_value.value,
                                         mask=mask[None, None])
    else:
      positions = jnp.arange(length)
      q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=True,
          implementation=attention_impl(self.impl, self.dtype, head_dim, length))
    return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="out",
                           kernel_init=nn.with_logical_partitioning(
                               init, ("heads", "head_dim", "embed")))(out)


class Block(nn.Module):
  """Pre-norm transformer block: attention then the configured FFN; returns (x, aux)."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, decode: bool):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = _rms_norm(dtype, param_dtype, "attn_norm")(x)
    x = x + Attention(cfg.n_heads, cfg.max_len, cfg.rope_base, cfg.attention, dtype,
                      param_dtype, name="attn")(h, decode=decode)
    h = _rms_norm(dtype, param_dtype, "ffn_norm")(x)
    y, aux = layers.ffn_from_config(cfg, dtype, param_dtype, name="ffn")(h, train=train)
    return x + y.astype(x.dtype), aux


def _merge_aux(auxes: list[dict]) -> dict:
  """Per-layer aux dicts to the model's aux dict (see the module docstring)."""
  out = {"aux_loss": sum(a["aux_loss"] for a in auxes)}
  if "expert_load" in auxes[0]:
    out["router_entropy"] = jnp.mean(jnp.stack([a["router_entropy"] for a in auxes]))
    out["expert_load"] = jnp.stack([a["expert_load"] for a in auxes])
  else:
    out["router_entropy"] = jnp.zeros((), jnp.float32)
  return out


class Transformer(nn.Module):
  """Decoder-only LM: tokens (B, L) int32 -> (logits (B, L, V) float32, aux).

  Build it with `build_model`, which validates the config first.
  """
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool, decode: bool = False):
    cfg = self.config
    if tokens.shape[-1] > cfg.max_len:
      raise ValueError(f"sequence length {tokens.shape[-1]} exceeds model.max_len="
                       f"{cfg.max_len}")
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = TokenEmbedding(cfg.vocab_size, cfg.d_model, cfg.embed_grad, dtype, param_dtype,
                       name="embed")(tokens)
    auxes = []
    for i in range(cfg.n_layers):
      x, aux = Block(cfg, name=f"block_{i}")(x, train=train, decode=decode)
      auxes.append(aux)
    x = _rms_norm(dtype, param_dtype, "final_norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), ("embed", "vocab")),
                      name="output")(x)
    return logits.astype(jnp.float32), _merge_aux(auxes)


def build_model(model_cfg: ml_collections.ConfigDict) -> Transformer:
  """The one constructor: validates `model_cfg` (ConfigError on a bad field), then builds."""
  config_lib.validate_model(model_cfg)
  return Transformer(ml_collections.FrozenConfigDict(model_cfg))
