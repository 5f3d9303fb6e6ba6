"""A GPU-sized byte-level OmniMoE LM for one H100 (bf16 compute, float32 parameters).

  python launch.py --config configs/gpu.py --workdir /tmp/run
  python launch.py --config configs/gpu.py:dense --workdir /tmp/run  # or :coarse_moe, :peer

d_model 1024, 8 layers, N = 65536 atomic experts (256 x 256 grid) per layer, k = 32, shared
SwiGLU width 4096, sequences of 1024 bytes, batch 16 (16k tokens a step): 1.2 B parameters
in all (mostly the expert tables), 0.14 B active per token. Tokens/s, MFU and loss against
the dense model of equal active parameters: experiments/RESULTS.md ("Training throughput").
"""
from omnimoe import config as config_lib
from omnimoe import params


def get_config(arg=None):
  """The GPU config; arg: None or an FFN kind ('dense', 'coarse_moe', 'peer')."""
  config = config_lib.base_config()
  m = config.model
  m.vocab_size = 256
  m.d_model = 1024
  m.n_layers = 8
  m.n_heads = 16
  m.max_len = 1024
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.omnimoe.num_experts = 65536
  m.omnimoe.top_k = 32
  m.omnimoe.shared_ffn_dim = 4096
  m.coarse_moe.num_experts = 64
  m.coarse_moe.top_k = 6
  m.coarse_moe.num_shared = 2
  m.peer.num_experts = 65536
  m.peer.key_dim = 256

  config.train.steps = 20000
  config.train.batch_size = 16
  config.train.seq_len = 1024
  config.train.lr = 6e-4
  config.train.warmup_steps = 1000
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.eval_steps = 20
  config.checkpoint.every = 1000
  config.checkpoint.keep = 3
  return params.ffn_variant(config, arg, multiple=64)
