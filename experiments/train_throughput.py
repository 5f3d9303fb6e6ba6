"""Training throughput of LMs of equal active parameters: tokens/s, MFU, loss.

Runs `launch.py` once per FFN kind on the same config file (fresh workdirs, same seed and
data order) and prints a table from each run's metrics.jsonl; the first logged interval
(compilation) is left out of the medians.

  python experiments/train_throughput.py --config configs/gpu.py --steps 150 \
      --kinds omnimoe,dense [--set train.batch_size=16 ...]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, kind: str, steps: int, log_every: int, overrides: list[str]) -> list[dict]:
  spec = config if kind == "omnimoe" else f"{config}:{kind}"
  workdir = tempfile.mkdtemp(prefix=f"throughput-{kind}-")
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={spec}",
         f"--workdir={workdir}", f"--config.train.steps={steps}",
         f"--config.train.log_every={log_every}", f"--config.train.eval_every={steps}",
         f"--config.checkpoint.every={steps}"] + [f"--config.{o}" for o in overrides]
  subprocess.run(cmd, cwd=REPO, check=True)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/gpu.py")
  parser.add_argument("--kinds", default="omnimoe,dense")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=v")
  args = parser.parse_args()
  rows = {}
  for kind in args.kinds.split(","):
    records = run(args.config, kind, args.steps, args.log_every, args.set)
    train = [r for r in records if r["split"] == "train"][1:]
    val = [r for r in records if r["split"] == "val"]
    rows[kind] = dict(
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in train),
        mfu=statistics.median(r.get("mfu") or float("nan") for r in train),
        loss=train[-1]["loss"], val_loss=val[-1]["loss"] if val else float("nan"))
  base = rows.get("dense")
  print("| ffn | tokens/s | vs dense | MFU | train loss | val loss |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for kind, r in rows.items():
    ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    print(f"| {kind} | {r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['mfu']:.1%} | "
          f"{r['loss']:.3f} | {r['val_loss']:.3f} |")


if __name__ == "__main__":
  main()
