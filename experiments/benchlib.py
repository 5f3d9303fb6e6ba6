"""What the GPU benchmarks share: logging, timing, random inputs, ceilings, memory.

Times are host-timed medians of 7 trials of back-to-back calls (async dispatch, one
block at the end) rotating over several input sets; `timeit_unrolled` jits several calls
into one program to remove dispatch gaps from short kernels; `trace_calls` + `busy_ms` read
the kernels' own busy time from a profiler trace. Inputs are random, never
zeros. Peak memory is XLA's own accounting of the compiled program (arguments + outputs +
temporaries, minus donated aliases), so it needs no run and no allocator reset.
"""
from __future__ import annotations

import collections
import glob
import os
import statistics
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe import reference

BF16 = jnp.bfloat16
LOG = []


def say(*args):
  line = " ".join(str(a) for a in args)
  print(line, flush=True)
  LOG.append(line)


def run_header() -> str:
  """One line naming what produced a log: device, JAX, time, command line and XLA_FLAGS
  (flags such as the command-buffer scheduling mode change every figure)."""
  return (f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}; argv {' '.join(sys.argv)}; "
          f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")


def device_tag(device: str) -> str:
  """A device kind as it goes into result file names ("NVIDIA H100 80GB HBM3" ->
  "nvidia-h100-80gb-hbm3")."""
  return device.lower().replace(" ", "-")


def timeit(fn, arg_sets, *, trials=7, target_s=0.02):
  """Median ms per call of jitted `fn` over rotating `arg_sets`."""
  jax.block_until_ready(fn(*arg_sets[0]))
  t0 = time.perf_counter()
  for args in arg_sets:
    out = fn(*args)
  jax.block_until_ready(out)
  per = (time.perf_counter() - t0) / len(arg_sets)
  reps = max(len(arg_sets), int(target_s / max(per, 1e-6)))
  times = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for i in range(reps):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times) * 1e3


def timeit_unrolled(fn, arg_sets):
  """ms per call with len(arg_sets) calls inside one jit (no dispatch gaps)."""
  many = jax.jit(lambda sets: [fn(*args) for args in sets])
  return timeit(many, [(list(arg_sets),)]) / len(arg_sets)


def device_events(trace_dir: str) -> list[tuple[str, int, int, str | None]]:
  """(kernel name, start ns, end ns, launching HLO op) of every kernel in the profiler
  traces under `trace_dir`: the device planes' stream lines (none on the CPU backend)."""
  events = []
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:"):
        continue
      for line in plane.lines:
        if line.name.startswith("XLA"):  # module / op summaries repeat the stream events
          continue
        events += [(e.name, e.start_ns, e.end_ns, dict(e.stats).get("hlo_op"))
                   for e in line.events]
  return events


def kernel_table(events, *, calls: int = 1, top: int = 30) -> list[dict]:
  """Device time per kernel name, most expensive first, per call of what was traced:
  [{"kernel", "hlo_op", "ms_per_call", "launches_per_call"}], the `top` of them. `hlo_op`
  is the launching HLO instruction as the trace names it; under XLA's command buffers
  (CUDA graphs) that is the buffer, and the kernel name is the fusion's (`fusion_12` for
  `%fusion.12` in the compiled program's text)."""
  ns, launches, ops = collections.Counter(), collections.Counter(), {}
  for name, start, end, op in events:
    ns[name] += end - start
    launches[name] += 1
    ops.setdefault(name, op)
  return [{"kernel": name, "hlo_op": ops[name], "ms_per_call": t / calls / 1e6,
           "launches_per_call": launches[name] / calls} for name, t in ns.most_common(top)]


def busy_ms(events) -> float:
  """ms during which at least one kernel ran (the union of the kernels' intervals)."""
  total, reach = 0, None
  for _, start, end, _ in sorted(events, key=lambda e: e[1]):
    if reach is None or start > reach:
      total, reach = total + end - start, end
    elif end > reach:
      total, reach = total + end - reach, end
  return total / 1e6


def trace_calls(fn, arg_sets, calls: int):
  """Device events (`device_events`) of `calls` calls of jitted `fn` rotating over
  `arg_sets`, traced after one warm-up call."""
  jax.block_until_ready(fn(*arg_sets[0]))
  trace_dir = tempfile.mkdtemp(prefix="omnimoe-trace-")
  with jax.profiler.trace(trace_dir):
    for i in range(calls):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
  return device_events(trace_dir)


def kernel_times(fn, *, calls=3, top=30) -> list[dict]:
  """`kernel_table` of `calls` calls of `fn()`, traced here."""
  return kernel_table(trace_calls(fn, [()], calls), calls=calls, top=top)


def peak_gib(jitted, *args) -> float:
  """Device memory (GiB) the compiled program needs: arguments, outputs, temporaries."""
  m = jitted.lower(*args).compile().memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 30


def guarded(label, thunk):
  try:
    return thunk()
  except Exception as e:  # keep going: one failing variant must not end the run
    say(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}")
    traceback.print_exc()
    return None


def key_iter(seed):
  key = jax.random.PRNGKey(seed)
  while True:
    key, sub = jax.random.split(key)
    yield sub


def log_probs(key, tokens, n):
  return jax.nn.log_softmax(2.0 * jax.random.normal(key, (tokens, n), jnp.float32), axis=-1)


def tables(key, n_experts, d, dtype=BF16):
  ku, kv = jax.random.split(key)
  return (jax.random.normal(ku, (n_experts, d), dtype),
          jax.random.normal(kv, (n_experts, d), dtype))


def tokens_in(key, tokens, d, dtype=BF16):
  return (jax.random.normal(key, (tokens, d), jnp.float32) / np.sqrt(d) * 3).astype(dtype)


def shared_mlp(p, x):
  """The shared SwiGLU MLP as `layers.SharedMLP` computes it, on a (d, 2, F) gate-and-up
  weight `w_gate_up` and a (F, d) `wd`."""
  return reference.swiglu(jnp.einsum("td,dcf->tcf", x, p["w_gate_up"])) @ p["wd"]


def rel_err(got, want):
  got = jnp.asarray(got, jnp.float32)
  want = jnp.asarray(want, jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def fwd_bwd(fn, num_diff):
  """jit of (cot, *args) -> value and grads of <fn(*args), cot> wrt the first num_diff."""
  def run(cot, *args):
    return jax.value_and_grad(lambda *a: jnp.vdot(fn(*a).astype(jnp.float32), cot),
                              argnums=tuple(range(num_diff)))(*args)
  return jax.jit(run)


def ceilings(seed):
  """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
  keys = key_iter(seed)
  a = jax.random.normal(next(keys), (2 ** 29,), BF16)  # 1 GiB
  copy = timeit(jax.jit(lambda a: a + BF16(1)), [(a,)])
  bw = 2 * a.size * 2 / (copy * 1e-3)
  del a
  m = jax.random.normal(next(keys), (8192, 8192), BF16)
  mm = timeit(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32
                                           ).astype(BF16)), [(m, m)])
  rate = 2 * 8192 ** 3 / (mm * 1e-3)
  say(f"\n== ceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul "
      f"{rate / 1e12:.0f} TFLOP/s")
  return dict(copy_bytes_per_s=bw, matmul_flops_per_s=rate)
