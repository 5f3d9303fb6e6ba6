"""The miniature quality comparison of issue "Experiments": four LMs of equal active
parameters, same data order and token budget, a few minutes each on one H100.

  python experiments/train_throughput.py --config configs/quality.py \
      --kinds omnimoe,dense,coarse_moe,peer --steps 1200 --log_every 100 --out DIR
  python launch.py --config configs/quality.py:peer --workdir /tmp/run  # one of them

d_model 512, 8 layers, sequences of 512 bytes, batch 32 (16k tokens a step) on the
built-in corpus (Python standard library source). OmniMoE: N = 16384 atomic experts
(128 x 128 grid) per layer, k = 32, shared SwiGLU width 1024; the arg switches the FFN kind
at equal active non-embedding parameters (`omnimoe.params.match_active`): dense SwiGLU,
DeepSeekMoE-style coarse MoE (2 shared + 32 routed experts, top-4), PEER (16384 experts,
21 heads x 16: the head count is solved by `match_active`). Validation every 200 steps on
the held-out split under launch.py (`train_throughput.py` validates once, at its last step,
unless given `--set train.eval_every=200`).

OmniMoE here is as released (exp weights, BatchNorm router). The ablations in
experiments/RESULTS.md found it ahead of dense and coarse MoE at 400 steps with
`--config.model.omnimoe.routing_weights=softmax --config.train.expert_lr_scale=4`.
"""
from omnimoe import config as config_lib
from omnimoe import params


def get_config(arg=None):
  """The quality config; arg: None or an FFN kind ('dense', 'coarse_moe', 'peer')."""
  config = config_lib.base_config()
  m = config.model
  m.vocab_size = 256
  m.d_model = 512
  m.n_layers = 8
  m.n_heads = 8
  m.max_len = 512
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.omnimoe.num_experts = 16384
  m.omnimoe.top_k = 32
  m.omnimoe.shared_ffn_dim = 1024
  m.coarse_moe.num_experts = 32
  m.coarse_moe.top_k = 4
  m.coarse_moe.num_shared = 2
  m.peer.num_experts = 16384
  m.peer.num_heads = 8
  m.peer.key_dim = 128

  config.train.steps = 1200
  config.train.batch_size = 32
  config.train.seq_len = 512
  config.train.lr = 1e-3
  config.train.warmup_steps = 100
  config.train.log_every = 100
  config.train.eval_every = 200
  config.train.eval_steps = 16
  config.checkpoint.every = 1200
  return params.ffn_variant(config, arg, multiple=64)
