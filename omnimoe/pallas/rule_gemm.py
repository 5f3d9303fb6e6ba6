"""The rule path's forward grid A = M W act(x U^T) in one Mosaic GPU kernel.

Reference: `expert_rule`'s two steps, S = `expert_dense.grid_dot(x, up.T)` (cuBLAS) and
its forward grid pass (`expert_rule._forward_values` on `expert_rule._rule_grid`): the
same mask M (the top-k's membership rule on the int32 keys of fl32(lx[t, i] + ly[t, j])),
the same weights W = exp(lx[i]) exp(ly[j]) and activation, in float32; only S differs,
taken here from the float32 accumulator instead of its bf16 rounding.

Why. In the forward alone the grid S exists only to be read back by the pass: cuBLAS
writes T N bf16 elements (839 MB at the headline, T = 4096, N = 102,400) and the pass
reads its busy rows and writes A. Here the accumulator goes through the rule in the
GEMM's epilogue and only A is stored. A Pallas-Triton GEMM with this epilogue lost
(v21: 2.76 ms against cuBLAS + pass, 1.12 + 0.74): its main loop ran at ~614 TFLOP/s.
Mosaic GPU gives the Hopper pieces a GEMM needs to keep cuBLAS's rate: TMA loads, wgmma,
a warp-specialised pipeline (one producer warpgroup, two consumers).

Layout. A persistent kernel (one program per SM) walks the (token tile, expert tile)
pairs, the expert tiles of one token tile first (`plgpu.planar_snake`, bands of one tile;
on one H100, experiments/results/rule-gemm-*-v25{a,b}-log.txt: the other order, meant to
read each U tile from memory once, ran 3.07 against 1.94 ms, bands of 2-8 tiles
1.96-2.01). An expert tile is `2 tile_n` columns, one per consumer warpgroup, and divides
n_y, so it lies in one grid row i: the epilogue needs lx[t, i] as one value a token (read
from lx^T), ly[t, j] as a block, and theta's key and cut a token.
It runs in `epi_m x epi_n` sub-tiles, each stored through shared memory by TMA while the
next is computed. A sub-tile's ly block comes by TMA into one of two shared-memory slots
per consumer warpgroup, issued two sub-tiles ahead (the first two while the main loop
runs) and refilled once `commit_smem`'s warpgroup barrier shows every thread has read it.

Measured (one H100, T = 4096, d = 1024, bf16, device time; experiments/RESULTS.md "The
forward grid in one Mosaic GPU GEMM"), with ly read straight from global memory
(`plgpu.load`, unoptimised), before the TMA slots: 1.858 ms at the headline (n = 320,
k = 4096) against cuBLAS S + the grid pass, 1.900 (cuBLAS S alone 1.052; this kernel
storing S with no rule 1.171); 1.867 against 1.683 at k = 1024. Of the epilogue's
~0.69 ms, ~0.5 was those ly loads (1.359 ms without them), which the TMA slots replace;
the slots are not yet timed (`experiments/bench_rule_gemm.py`). Until it wins,
`expert_rule` uses it only when asked (`RuleConfig.forward_grid="gemm"`).

Interpret mode (CPU tests; `jax._src.pallas.mosaic_gpu.interpret`, JAX >= 0.10) runs
the same kernel body with two substitutions it needs: U^T blocks instead of transposed
U blocks (the interpreter has no transposed shared-memory refs) and plain reads of lx,
theta's key and cut instead of `plgpu.load` from global memory. The tests also lower the
GPU form on the CPU (`test_lowers_for_gpu`: Mosaic GPU's layout inference and lowering).

Equivalent JAX code (per token block):
  s = x @ up.T (float32)
  mask, w = expert_rule._rule_grid(lx, ly, theta, cut)
  a = where(mask, w * act(s), 0).astype(x.dtype)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from omnimoe.pallas import common
from omnimoe.pallas.router_threshold import kept
from omnimoe.pallas.router_topk import _ordered_key

F32 = jnp.float32
DTYPES = (jnp.bfloat16, jnp.float16)
# In-kernel forms: silu(s) = s sigmoid(s) = s (1 + tanh(s / 2)) / 2, one tanh and no
# division (Mosaic GPU lowers no logistic; its divisions are IEEE-exact and slow).
ACTIVATIONS = {
    "silu": lambda s: 0.5 * s * (1.0 + jnp.tanh(0.5 * s)),
    "relu": lambda s: jnp.maximum(s, 0.0),
    "identity": lambda s: s,
}
MAX_TILE_N = 256  # wgmma's widest N
# An H100's shared memory a block (227 KB), less what Mosaic GPU adds (barriers, alignment)
SHARED_MEMORY_BYTES = 232_448 - 1024


@dataclasses.dataclass(frozen=True)
class RuleGemmConfig:
  """Launch of `rule_gemm`: tokens per tile, the contraction step, pipeline stages
  (`shared_memory_bytes`: 3 stages of the defaults at n_y = 320 fit an H100's 227 KB, 4
  do not), the epilogue's sub-tile and Mosaic GPU's approximate exp and tanh
  (`approx_math`: 1.858 against 2.124 ms exact; A is stored in 16 bits)."""
  tile_m: int = 128
  tile_k: int = 64
  stages: int = 3
  epi_m: int = 64
  epi_n: int = 32
  approx_math: bool = True

  def __post_init__(self):
    for name in ("tile_m", "tile_k", "epi_m", "epi_n"):
      common.check_pow2(f"RuleGemmConfig.{name}", getattr(self, name), minimum=16)
    if self.tile_m % 64 or self.epi_m > self.tile_m or self.tile_m % self.epi_m:
      raise ValueError(f"RuleGemmConfig: tile_m must be a multiple of 64 and of epi_m, got "
                       f"tile_m={self.tile_m}, epi_m={self.epi_m}")
    if not isinstance(self.stages, int) or self.stages < 1:
      raise ValueError(f"RuleGemmConfig.stages must be an int >= 1, got {self.stages!r}")


def tile_n(n_y: int, config: RuleGemmConfig = RuleGemmConfig()) -> int | None:
  """A consumer warpgroup's columns: the widest multiple of epi_n up to 256 with 2 tile_n
  dividing n_y, or None (no expert tile lies in one grid row: not served)."""
  for width in range(MAX_TILE_N - MAX_TILE_N % config.epi_n, 0, -config.epi_n):
    if n_y % (2 * width) == 0:
      return width
  return None


def shared_memory_bytes(width: int, config: RuleGemmConfig) -> int:
  """The kernel's shared memory: the pipeline's stages of x and U blocks (16-bit), and per
  consumer warpgroup two epilogue slots of A (16-bit) and of ly (float32)."""
  stages = config.stages * (config.tile_m + 2 * width) * config.tile_k * 2
  return stages + 2 * 2 * config.epi_m * config.epi_n * (2 + 4)


def supported(x_dtype, table_dtype, d: int, n_y: int, activation: str,
              config: RuleGemmConfig = RuleGemmConfig()) -> bool:
  """Whether `rule_gemm` serves these inputs (else the caller keeps GEMM + pass)."""
  width = tile_n(n_y, config)
  return (jnp.dtype(x_dtype) in map(jnp.dtype, DTYPES) and jnp.dtype(x_dtype) == jnp.dtype(
      table_dtype) and activation in ACTIVATIONS and d % config.tile_k == 0 and
          width is not None and shared_memory_bytes(width, config) <= SHARED_MEMORY_BYTES)


def _read(ref, layout, interpret: bool):
  """A global-memory block into registers in `layout` (the interpreter: a plain read)."""
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=layout, optimized=False)


def _column_ids(shape, interpret: bool):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, 1)
  return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)


def _kernel(x_gmem, u_gmem, lxt_gmem, ly_gmem, bound_gmem, cut_gmem, a_gmem, *,
            config: RuleGemmConfig, width: int, n_y: int, activation: str, interpret: bool):
  tokens, d = x_gmem.shape
  tm, tk, epi_m, epi_n = config.tile_m, config.tile_k, config.epi_m, config.epi_n
  cta_n = 2 * width
  m_tiles, n_tiles = tokens // tm, a_gmem.shape[1] // cta_n
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def smem_transforms(columns, itemsize):
    swizzle = plgpu.find_swizzle(columns * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

  in_transforms = smem_transforms(tk, x_gmem.dtype.itemsize)
  if interpret:
    u_spec = plgpu.BlockSpec((tk, cta_n), lambda k: (k, 0), transforms=in_transforms)
  else:
    u_spec = plgpu.BlockSpec((cta_n, tk), lambda k: (0, k), transforms=in_transforms)

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(d // tk,), memory_registers=40,
        in_specs=[plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=in_transforms),
                  u_spec],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.stages,
        compute_context=context)

  ignore = lambda *_, **__: None  # noqa: E731 (allocations do not depend on the bodies)

  @functools.partial(
      pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(x_gmem, u_gmem),
      out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), a_gmem.dtype,
                          transforms=smem_transforms(epi_n, a_gmem.dtype.itemsize)),
      ly_smem=plgpu.SMEM((2, 2, epi_m, epi_n), F32, transforms=smem_transforms(epi_n, 4)),
      ly_ready=plgpu.Barrier(num_arrivals=1, num_barriers=4),
      collective_axes="wg")
  def _scope(allocs, out_smem, ly_smem, ly_ready):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
    def _tile(info):
      (flat,) = info.index
      m_idx, n_idx = plgpu.planar_snake(flat, (m_tiles, n_tiles), 1, 1)
      first = n_idx * cta_n
      row = first // n_y
      column = first - row * n_y + wg * width  # this warpgroup's first grid column j
      # the epilogue's sub-tiles (token rows mi, columns ni); sub-tile s uses slot s % 2
      subtiles = [(mi, ni) for mi in range(tm // epi_m) for ni in range(width // epi_n)]
      tokens_of = lambda mi: pl.ds(m_idx * tm + mi * epi_m, epi_m)  # noqa: E731

      def fetch_ly(s):
        """TMA of sub-tile s's ly block into its slot; the epilogue waits on it."""
        mi, ni = subtiles[s]
        plgpu.copy_gmem_to_smem(ly_gmem.at[tokens_of(mi), pl.ds(column + ni * epi_n, epi_n)],
                                ly_smem.at[wg, s % 2], ly_ready.at[2 * wg + s % 2])

      def epilogue(run):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, width), F32))
        def _acc(acc_ref):
          for s in range(min(2, len(subtiles))):  # in flight during the main loop
            fetch_ly(s)
          run(acc_ref)
          acc = acc_ref[...]
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          for s, (mi, ni) in enumerate(subtiles):
            tok, slot = tokens_of(mi), s % 2
            if ni == 0:
              lx, bound, cut = [
                  lax.broadcast_in_dim(_read(ref, row_layout, interpret), (epi_m, epi_n), [0])
                  for ref in (lxt_gmem.at[row, tok], bound_gmem.at[tok], cut_gmem.at[tok])]
              wx = jnp.exp(lx)
            j = column + ni * epi_n
            plgpu.barrier_wait(ly_ready.at[2 * wg + slot])
            ly = ly_smem[wg, slot]
            ids = row * n_y + j + _column_ids((epi_m, epi_n), interpret)
            routed = kept(lx + ly, ids, bound, cut)
            s_tile = acc[mi * epi_m:(mi + 1) * epi_m, ni * epi_n:(ni + 1) * epi_n]
            a = jnp.where(routed, wx * jnp.exp(ly) * ACTIVATIONS[activation](s_tile), 0.0)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[wg, slot] = a.astype(a_gmem.dtype)
            plgpu.commit_smem()  # also: every thread has read ly's slot, so refill it
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg, slot],
                a_gmem.at[tok, pl.ds(first + wg * width + ni * epi_n, epi_n)])
            if s + 2 < len(subtiles):
              fetch_ly(s + 2)

      def mma(unused_idx, x_smem, u_smem, acc_ref):
        if interpret:
          plgpu.wgmma(acc_ref, x_smem, u_smem.at[:, pl.ds(wg * width, width)])
        else:
          plgpu.wgmma(acc_ref, x_smem,
                      u_smem.at[pl.ds(wg * width, width)].transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref

      u_tile = (u_gmem.at[:, pl.ds(first, cta_n)] if interpret
                else u_gmem.at[pl.ds(first, cta_n), :])
      pipeline(mma, epilogue)(x_gmem.at[pl.ds(m_idx * tm, tm), :], u_tile,
                              allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def runs_here(interpret: bool) -> bool:
  """Whether the kernel can run: interpret mode, or a Hopper GPU (wgmma is sm_90's)."""
  device = jax.devices()[0]
  return interpret or (device.platform == "gpu" and
                       str(getattr(device, "compute_capability", "")).split(".")[0] == "9")


def _num_sms() -> int:
  return jax.devices()[0].core_count if jax.default_backend() == "gpu" else 4


def rule_gemm(x: jax.Array, up: jax.Array, lx: jax.Array, ly: jax.Array, theta: jax.Array,
              cut: jax.Array, *, activation: str = "silu",
              config: RuleGemmConfig = RuleGemmConfig(), num_sms: int | None = None,
              interpret: bool | None = None) -> jax.Array:
  """A (T, N) in x.dtype: act(<x_t, up[e]>) exp(lx[t, i]) exp(ly[t, j]) where the rule
  (theta, cut) routes e = i n_y + j to t, else 0. Inputs as `expert_rule.
  atomic_experts_rule`'s; `supported(...)` must hold. Any T (padded to tile_m inside)."""
  tokens, d = x.shape
  n_x, n_y = lx.shape[1], ly.shape[1]
  if not supported(x.dtype, up.dtype, d, n_y, activation, config):
    raise ValueError(f"rule_gemm does not serve x {x.dtype}, up {up.dtype}, d={d}, "
                     f"n_y={n_y}, activation {activation!r} (see `supported`)")
  interpret = common.resolve_interpret(interpret)
  padded = common.cdiv(tokens, config.tile_m) * config.tile_m
  pad = lambda a, fill: jnp.pad(a, [(0, padded - tokens)] + [(0, 0)] * (a.ndim - 1),  # noqa: E731
                                constant_values=fill)
  # padded tokens route nothing: theta = +inf has the largest key
  bound = _ordered_key(pad(theta.astype(F32), jnp.inf))
  kernel = plgpu.kernel(
      functools.partial(_kernel, config=config, width=tile_n(n_y, config), n_y=n_y,
                        activation=activation, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((padded, n_x * n_y), x.dtype),
      grid=(num_sms or _num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=config.approx_math,
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else None)
  a = kernel(pad(x, 0), up.T if interpret else up, pad(lx.astype(F32), 0).T,
             pad(ly.astype(F32), 0), bound, pad(cut.astype(jnp.int32), -1))
  return a[:tokens]


def _interpret_params():
  """Mosaic GPU interpret mode's parameters: public from JAX 0.11, private in 0.10."""
  params = getattr(plgpu, "InterpretGPUParams", None)
  if params is None:
    from jax._src.pallas.mosaic_gpu.interpret import params as private  # noqa: PLC0415
    params = private.InterpretGPUParams
  return params()
