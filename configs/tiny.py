"""Tiny byte-level OmniMoE LM: a smoke test that runs in seconds on a CPU.

  python launch.py --config configs/tiny.py --workdir /tmp/run
  python launch.py --config configs/tiny.py:dense --workdir /tmp/run   # or :coarse_moe, :peer

d_model 32, 2 layers, N = 64 atomic experts (8 x 8 grid), k = 4, sequences of 32 bytes;
50 steps of a few ms each on a CPU. Expect the next-byte loss (nats) to fall from about 6
to about 3.5. The arg switches the FFN kind at equal active non-embedding parameters
(`omnimoe.params.match_active`); it is applied before command-line overrides, so override
model sizes together with the arg's matched size.
"""
from omnimoe import config as config_lib
from omnimoe import params


def get_config(arg=None):
  """The tiny config; arg: None or an FFN kind ('dense', 'coarse_moe', 'peer')."""
  config = config_lib.base_config()
  m = config.model
  m.vocab_size = 256
  m.d_model = 32
  m.n_layers = 2
  m.n_heads = 2
  m.max_len = 64
  m.omnimoe.num_experts = 64
  m.omnimoe.top_k = 4
  m.omnimoe.shared_ffn_dim = 64
  m.coarse_moe.num_experts = 8
  m.coarse_moe.top_k = 2
  m.peer.num_experts = 256
  m.peer.key_dim = 16

  config.train.steps = 50
  config.train.batch_size = 8
  config.train.seq_len = 32
  config.train.lr = 3e-3
  config.train.warmup_steps = 5
  config.train.log_every = 10
  config.train.eval_every = 25
  config.train.eval_steps = 2
  config.checkpoint.every = 25
  return params.ffn_variant(config, arg)
