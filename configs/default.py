"""A small byte-level OmniMoE LM that trains in a few minutes on 2 CPU cores.

  python launch.py --config configs/default.py --workdir /tmp/run
  python launch.py --config configs/default.py:dense --workdir /tmp/run  # or :coarse_moe, :peer

d_model 128, 4 layers, N = 4096 atomic experts (64 x 64 grid), k = 16, shared SwiGLU
width 384, sequences of 128 bytes, batch 16; 300 steps of ~0.35 s on 2 CPU cores (about
2 minutes). Expect the next-byte loss to fall from about 6 nats to 1.5-2 on Python source
text. On the same CPU, :dense takes ~0.17 s a step, :coarse_moe ~0.9 s (dense dispatch) and
:peer ~8 s (the reference router sorts k*k candidates per head; use tiny.py:peer on a
CPU). The arg switches the FFN kind at equal active non-embedding parameters
(`omnimoe.params.match_active`); it is applied before command-line overrides.
"""
from omnimoe import config as config_lib
from omnimoe import params


def get_config(arg=None):
  """The default config; arg: None or an FFN kind ('dense', 'coarse_moe', 'peer')."""
  config = config_lib.base_config()
  m = config.model
  m.vocab_size = 256
  m.d_model = 128
  m.n_layers = 4
  m.n_heads = 4
  m.max_len = 256
  m.omnimoe.num_experts = 4096
  m.omnimoe.top_k = 16
  m.omnimoe.shared_ffn_dim = 384
  m.coarse_moe.num_experts = 16
  m.coarse_moe.top_k = 4
  m.peer.num_experts = 4096
  m.peer.key_dim = 32

  config.train.steps = 300
  config.train.batch_size = 16
  config.train.seq_len = 128
  config.train.lr = 3e-3
  config.train.warmup_steps = 30
  config.train.log_every = 25
  config.train.eval_every = 100
  config.train.eval_steps = 8
  config.checkpoint.every = 100
  return params.ffn_variant(config, arg)
