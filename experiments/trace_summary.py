"""What a profiler trace says about the device: how long it was busy, and on what.

Reads the traces under a folder (e.g. the launcher's `workdir/profile`, written with
`--config.train.profile_start=S --config.train.profile_steps=K`) and prints the span from
the first kernel's start to the last one's end, the time at least one kernel ran (busy),
and the most expensive kernels, per step when `--steps` says how many the trace holds.
Busy well under the span means the device waited on the host (data, dispatch, logging).

  PYTHONPATH=. python3 experiments/trace_summary.py WORKDIR/profile --steps 5 [--top 30]
"""
import argparse

from experiments.benchlib import busy_ms, device_events, kernel_table


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--steps", type=int, default=1, help="steps (calls) the trace holds")
  parser.add_argument("--top", type=int, default=30, help="kernels to list")
  args = parser.parse_args(argv)
  events = device_events(args.trace_dir)
  if not events:
    raise SystemExit(f"{args.trace_dir}: no device kernels in its traces (a CPU run has none)")
  span = (max(e[2] for e in events) - min(e[1] for e in events)) / 1e6
  busy = busy_ms(events)
  print(f"span {span:.2f} ms, device busy {busy:.2f} ms ({busy / span:.0%}); "
        f"per step: {span / args.steps:.2f} / {busy / args.steps:.2f} ms")
  for k in kernel_table(events, calls=args.steps, top=args.top):
    print(f"{k['ms_per_call']:9.3f} ms {k['launches_per_call']:6.0f}x  {k['kernel'][:90]}")


if __name__ == "__main__":
  main()
