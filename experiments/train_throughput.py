"""Training runs of LMs of equal active parameters: tokens/s, MFU, peak memory, loss.

Runs `launch.py` once per FFN kind on the same config file (fresh workdirs, same seed and
data order) and prints a table from each run's metrics.jsonl; the first timed interval
(the steps after compilation, still warming up) is left out of the medians when there
are others. A `--variant NAME:A=1,B=2` run is the config's
own FFN kind with extra overrides (an ablation), reported as NAME. With --out, every
run's metrics go to one JSON file; `--plot FILE` draws the validation curves of such a
file into a PNG beside it.

  python experiments/train_throughput.py --config configs/gpu.py --steps 150 \
      --kinds omnimoe,dense [--set train.batch_size=16 ...] [--out DIR]
  python experiments/train_throughput.py --config configs/quality.py --kinds omnimoe \
      --variant norm_none:model.omnimoe.router_norm=none [--variant ...]
  python experiments/train_throughput.py --plot DIR/train-runs.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(spec: str, name: str, steps: int, log_every: int, overrides: list[str]
        ) -> tuple[list[dict], int]:
  """The run's metrics.jsonl records and its tokens per step."""
  workdir = tempfile.mkdtemp(prefix=f"throughput-{name}-")
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={spec}",
         f"--workdir={workdir}", f"--config.train.steps={steps}",
         f"--config.train.log_every={log_every}", f"--config.train.eval_every={steps}",
         f"--config.checkpoint.every={steps}"] + [f"--config.{o}" for o in overrides]
  subprocess.run(cmd, cwd=REPO, check=True)
  with open(os.path.join(workdir, "config.json")) as f:
    train_cfg = json.load(f)["train"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f], train_cfg["batch_size"] * train_cfg["seq_len"]


def timed_intervals(train_records: list[dict]) -> list[dict]:
  """The train intervals whose throughput the medians use: those that timed steps (an
  interval of the compiling step alone has none), less the first when there are others."""
  timed = [r for r in train_records if "tokens_per_s" in r]
  if not timed:
    raise SystemExit("no timed training interval: run more steps than --log_every")
  return timed[1:] or timed


def plot(path: str) -> None:
  """Validation loss against training tokens, one curve per FFN kind."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(path) as f:
    runs = json.load(f)
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, run in runs["runs"].items():
    val = [r for r in run if r["split"] == "val"]
    ax.plot([r["step"] * runs["tokens_per_step"] / 1e6 for r in val],
            [r["loss"] for r in val], marker="o", label=kind)
  ax.set(xlabel="training tokens (M)", ylabel="validation loss (nats/byte)",
         title=runs["title"])
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path.replace(".json", ".png"), dpi=120)
  print(path.replace(".json", ".png"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="write all runs' metrics to DIR/train-runs.json")
  parser.add_argument("--plot", help="draw the validation curves of this JSON and exit")
  parser.add_argument("--config", default="configs/gpu.py")
  parser.add_argument("--kinds", default="omnimoe,dense")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=v")
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME:a.b=v[,c.d=w]: the config's own kind with these overrides")
  args = parser.parse_args()
  if args.plot:
    return plot(args.plot)
  plan = [(kind, args.config if kind == "omnimoe" else f"{args.config}:{kind}", args.set)
          for kind in args.kinds.split(",") if kind]
  for variant in args.variant:
    name, sep, overrides = variant.partition(":")
    if not (sep and name and overrides):
      parser.error(f"--variant {variant!r}: expected NAME:a.b=v[,c.d=w]")
    plan.append((name, args.config, args.set + overrides.split(",")))
  rows, runs = {}, {}
  for name, spec, overrides in plan:
    records, tokens_per_step = run(spec, name, args.steps, args.log_every, overrides)
    runs[name] = records
    train = [r for r in records if r["split"] == "train"]
    timed = timed_intervals(train)
    val = [r for r in records if r["split"] == "val"]
    rows[name] = dict(
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
        mfu=statistics.median(r.get("mfu") or float("nan") for r in timed),
        peak_gib=max((r.get("peak_gib") or float("nan") for r in train), default=float("nan")),
        loss=train[-1]["loss"], val_loss=val[-1]["loss"] if val else float("nan"))
    if args.out:  # after every run, so that a run cut short keeps the finished ones
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "train-runs.json"), "w") as f:
        json.dump(dict(title=f"{args.config}, {args.steps} steps", runs=runs,
                       tokens_per_step=tokens_per_step, argv=sys.argv), f)
    print_table(rows)


def print_table(rows: dict) -> None:
  base = rows.get("dense")
  print("| ffn | tokens/s | vs dense | MFU | peak GiB | train loss | val loss |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for kind, r in rows.items():
    ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    print(f"| {kind} | {r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['mfu']:.1%} | "
          f"{r['peak_gib']:.1f} | {r['loss']:.3f} | {r['val_loss']:.3f} |", flush=True)

if __name__ == "__main__":
  main()
