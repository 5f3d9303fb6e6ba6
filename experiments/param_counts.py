"""Prints a markdown table of the parameter counts of every shipped config and FFN variant.

  python experiments/param_counts.py

Counts come from shapes alone (`omnimoe.params.count_params`, no allocation). 'active' includes
the input embedding table, 'active non-emb.' leaves it out; the output projection counts in both.
"""
import importlib.util
import pathlib

from omnimoe import params

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
VARIANTS = (None, "dense", "coarse_moe", "peer")


def load(name: str, arg):
  """`configs/<name>.py`'s get_config(arg), loaded by path as launch.py does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def shape_note(m) -> str:
  """The routed sizes of the FFN kind, in a few words."""
  if m.ffn == "omnimoe":
    c = m.omnimoe
    return f"N={c.num_experts}, k={c.top_k}, shared F={c.shared_ffn_dim}"
  if m.ffn == "coarse_moe":
    c = m.coarse_moe
    return f"{c.num_shared} shared + {c.num_experts} routed x {c.expert_dim}, top-{c.top_k}"
  if m.ffn == "peer":
    c = m.peer
    return f"N={c.num_experts}, {c.num_heads} heads x k={c.top_k}, key {c.key_dim}"
  return f"F={m.dense.ffn_dim}"


def human(n: int) -> str:
  return f"{n / 1e6:,.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def main():
  print("| config | ffn | routed sizes | total | active | active non-emb. |")
  print("| --- | --- | --- | ---: | ---: | ---: |")
  for name in ("tiny", "default", "gpu"):
    for arg in VARIANTS:
      m = load(name, arg).model
      c = params.count_params(m)
      label = f"{name}.py" + (f":{arg}" if arg else "")
      print(f"| {label} | {m.ffn} | {shape_note(m)} | {human(c['total'])} | "
            f"{human(c['active'])} | {human(c['active_non_embedding'])} |")


if __name__ == "__main__":
  main()
