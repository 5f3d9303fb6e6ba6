"""What a person sees during training: cost model, router health, and metric writers.

One line per log interval on the console, the same numbers in `workdir/metrics.jsonl` (one
JSON object per line, `{"step": s, "split": "train"|"val", ...}`) and in TensorBoard event
files under `workdir/tensorboard`.
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from absl import logging as absl_logging

from omnimoe import params

# Dense bf16 peak FLOP/s per chip, matched against `device_kind` in this order.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6", 918e12),
)


def peak_flops(device) -> float | None:
  """Dense bf16 peak FLOP/s of one device, None where unknown (e.g. CPU)."""
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in device.device_kind.lower():
      return flops
  return None


def peak_memory_gib() -> float | None:
  """Most device memory (GiB) in use at once so far on this process's first device; None
  where the backend keeps no such count (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 * active non-embedding params + attention + PEER's reuse.

  Attention adds 12 * layers * d * seq_len (scores and weighted sum, forward and backward,
  causal mask not discounted), as in the PaLM paper's MFU. A PEER layer's parameters are
  counted once (`params.count_params`), but each of its H heads multiplies the shared
  sub-key tables (key_dim * n) and takes k pairs of its own: the other H - 1 heads' sub-key
  products, and the pairs beyond the min(H k, N) rows counted, add 6 FLOPs a parameter too.
  """
  active = params.count_params(model_cfg)["active_non_embedding"]
  flops = 6 * active + 12 * model_cfg.n_layers * model_cfg.d_model * seq_len
  if model_cfg.ffn == "peer":
    c = model_cfg.peer
    pairs = c.num_heads * c.top_k
    reused = ((c.num_heads - 1) * c.key_dim * math.isqrt(c.num_experts)
              + (pairs - min(pairs, c.num_experts)) * 2 * model_cfg.d_model)
    flops += 6 * model_cfg.n_layers * reused
  return flops


def router_health(expert_load: np.ndarray) -> dict:
  """Summary of loads (layers, N) summed over an interval, averaged over routed layers.

  experts_used: fraction of experts that got at least one pair; load_max_mean: busiest
  expert's load over the mean load; load_cv: coefficient of variation of the loads.
  """
  load = np.asarray(expert_load, np.float64)
  mean = load.mean(axis=-1)
  safe = np.where(mean > 0, mean, 1.0)
  return {"experts_used": float((load > 0).mean()),
          "load_max_mean": float((load.max(axis=-1) / safe).mean()),
          "load_cv": float((load.std(axis=-1) / safe).mean())}


def quiet_library_logs() -> None:
  """Keeps orbax's and grain's INFO lines (dozens per checkpoint) off the console."""
  libs = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "grain"))
  absl_logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= absl_logging.converter.STANDARD_WARNING
      or not any(lib in r.pathname for lib in libs))


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_train_line(step: int, total: int, m: dict) -> str:
  """The console line of one log interval (`m` as written to metrics.jsonl)."""
  line = f"step {step:>{len(str(total))}}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e}"
  if "tokens_per_s" in m:
    mfu = f"{100 * m['mfu']:.1f}%" if "mfu" in m else "n/a"
    line += (f" | {m['tokens_per_s'] / 1e3:.1f}k tok/s | MFU {mfu}"
             f" | ETA {format_duration(m['eta_s'])}")
  if "peak_gib" in m:
    line += f" | peak mem {m['peak_gib']:.1f} GiB"
  if "experts_used" in m:
    line += (f" | experts used {100 * m['experts_used']:.0f}% max/mean {m['load_max_mean']:.2f}"
             f" cv {m['load_cv']:.2f} H {m['router_entropy']:.3f}")
  return line


def _record_step(line: str) -> float:
  """The step of a metrics.jsonl line; +inf (dropped on resume) for a line that a killed run
  left half-written."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    absl_logging.warning("metrics.jsonl: dropping a line that does not parse: %r", line[:80])
    return math.inf


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard (process 0 only).

  On resume from step s, records after s left by an interrupted run are dropped from both
  (and a line it left half-written), so that each file tells one history.
  """

  def __init__(self, workdir: str, resume_step: int):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    from tensorboardX import SummaryWriter
    self._path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self._path):
      with open(self._path) as f:
        kept = [line for line in f if _record_step(line) <= resume_step]
      with open(self._path, "w") as f:
        f.writelines(kept)
    self._jsonl = open(self._path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, split: str, scalars: dict) -> None:
    if not self._active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
