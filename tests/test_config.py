"""Config validation: every rule raises ConfigError naming its field; shipped configs pass."""
import importlib.util
import pathlib

import pytest

from omnimoe import config as config_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg=None):
  """A config file's get_config(arg), loaded by path as `--config configs/<name>.py` does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# (field path, bad value, extra overrides, words the message must contain)
BAD = [
    ("vocab_size", 0, {}, ">= 1"),
    ("d_model", -4, {}, ">= 1"),
    ("n_layers", 2.5, {}, "integer"),
    ("n_heads", True, {}, "integer"),
    ("max_len", 0, {}, ">= 1"),
    ("d_model", 66, {}, "divisible by model.n_heads"),
    ("n_heads", 8, {"d_model": 72}, "RoPE"),  # head_dim 9
    ("rope_base", 1.0, {}, "> 1"),
    ("rope_base", float("nan"), {}, "finite"),
    ("rope_base", "1e4", {}, "finite number"),
    ("attention", "cudnn", {"dtype": "bfloat16", "d_model": 36, "n_heads": 3}, "multiple of 8"),
    ("attention", "cudnn", {"dtype": "bfloat16", "d_model": 512, "n_heads": 2}, "up to 128"),
    ("dtype", "float16", {}, "one of"),
    ("param_dtype", "fp32", {}, "one of"),
    ("ffn", "moe", {}, "one of"),
    ("omnimoe.num_experts", 1000, {}, "perfect square (n*n)"),
    ("omnimoe.top_k", 0, {}, ">= 1"),
    ("omnimoe.top_k", 65, {"omnimoe.num_experts": 64}, "<= model.omnimoe.num_experts = 64"),
    ("omnimoe.shared_ffn_dim", 0, {}, ">= 1"),
    ("omnimoe.activation", "swish", {}, "one of"),
    ("omnimoe.routing_weights", "sigmoid", {}, "one of"),
    ("omnimoe.router_norm", "layernorm", {}, "one of"),
    ("omnimoe.impl", "triton", {}, "one of"),
    ("omnimoe.impl", "pallas", {"omnimoe.activation": "swiglu"}, "scalar activations"),
    ("dense.ffn_dim", 0, {"ffn": "dense"}, ">= 1"),
    ("coarse_moe.num_experts", 0, {"ffn": "coarse_moe"}, ">= 1"),
    ("coarse_moe.top_k", 17, {"ffn": "coarse_moe", "coarse_moe.num_experts": 16},
     "<= model.coarse_moe.num_experts"),
    ("coarse_moe.num_shared", -1, {"ffn": "coarse_moe"}, ">= 0"),
    ("coarse_moe.expert_dim", 0, {"ffn": "coarse_moe"}, ">= 1"),
    ("coarse_moe.aux_loss_coef", -0.1, {"ffn": "coarse_moe"}, ">= 0"),
    ("peer.num_experts", 200, {"ffn": "peer"}, "perfect square"),
    ("peer.top_k", 300, {"ffn": "peer", "peer.num_experts": 256}, "<= model.peer.num_experts"),
    ("peer.num_heads", 0, {"ffn": "peer"}, ">= 1"),
    ("peer.key_dim", 33, {"ffn": "peer"}, "even"),
    ("peer.activation", "tanh", {"ffn": "peer"}, "one of"),
    ("peer.impl", "cuda", {"ffn": "peer"}, "one of"),
    ("peer.impl", "pallas", {"ffn": "peer", "peer.activation": "swiglu"}, "scalar activations"),
]


def _set(cfg, path, value):
  *parents, leaf = path.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


@pytest.mark.parametrize("path,value,overrides,words", BAD,
                         ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_each_rule_names_its_field(path, value, overrides, words):
  cfg = config_lib.model_config()
  for p, v in overrides.items():
    _set(cfg, p, v)
  config_lib.validate_model(cfg)  # the overrides alone are valid
  _set(cfg, path, value)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate_model(cfg)
  message = str(err.value)
  assert message.startswith(f"model.{path}={value!r}: "), message
  assert words in message, message


def test_message_format_and_type():
  config = config_lib.base_config()
  config.model.omnimoe.num_experts = 1000
  with pytest.raises(ValueError, match=r"^model\.omnimoe\.num_experts=1000: must be a perfect "
                     r"square \(n\*n\)$"):
    config_lib.validate_model(config.model)


def test_other_kinds_sections_are_not_checked():
  cfg = config_lib.model_config()
  cfg.peer.num_experts = 1000  # not square, but ffn is omnimoe
  config_lib.validate_model(cfg)


def test_impl_none_and_auto_accepted():
  cfg = config_lib.model_config()
  with cfg.ignore_type():
    cfg.omnimoe.impl = None
  config_lib.validate_model(cfg)
  assert config_lib.resolve_impl(None) is None and config_lib.resolve_impl("auto") is None
  assert config_lib.resolve_impl("xla") == "xla"


@pytest.mark.parametrize("name", ["tiny", "default", "gpu"])
@pytest.mark.parametrize("arg", [None, "dense", "coarse_moe", "peer"])
def test_shipped_configs_validate(name, arg):
  config = load_config(name, arg)
  config_lib.validate_model(config.model)
  assert config.model.ffn == (arg or "omnimoe")
  for section in ("train", "data", "mesh", "checkpoint"):
    assert section in config
  assert config.train.seq_len <= config.model.max_len
