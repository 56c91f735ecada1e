"""Benchmark of the gated-LRU implementations: time, achieved bandwidth, fraction of copy bandwidth.

    python -m kernels.bench                                         # full sweep (GPU/TPU)
    JAX_PLATFORMS=cpu python -m kernels.bench --quick --interpret   # CPU smoke, Pallas interpreted

Inputs x_BTW, gate_x_BTW, gate_a_BTW, a_param_W; B = 8 clips x 197 tokens = 1576 by default.
Bandwidth counts only the bytes that must move, per (batch, time, width) position:
  forward:   reads x, gate_x, gate_a, writes h                                    = 4 elements
  fwd+bwd:   forward (4) + backward reading x, gate_x, gate_a, h, dh and writing
             dx, dgate_x, dgate_a                                                = 12 elements
(a_param, h0, h_last and the a_param gradient are O(B*W), ignored). The copy reference is a
plain device copy (y = -x: one read + one write) of the largest input, timed in the same run.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from kernels.gated_lru import gated_lru

ELEMS_PER_POSITION = {"fwd": 4, "fwd+bwd": 12}


def _time_ms(fn, *args, iters: int, repeats: int = 3) -> float:
  """Wall time of fn(*args) in ms: the best over `repeats` of the mean over `iters` calls
  (after compiling and a warmup call; the best, since other load only ever adds time)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / iters * 1e3)
  return best


def copy_bandwidth_gbs(num_bytes: int, iters: int) -> float:
  """GB/s of a plain device copy (read + write) of a num_bytes float32 array."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  ms = _time_ms(jax.jit(lambda v: -v), x, iters=iters)
  return 2 * num_bytes / (ms * 1e-3) / 1e9


def _make_fns(impl: str, interpret: bool | None):
  lru = functools.partial(gated_lru, impl=impl, interpret=interpret)
  fwd = jax.jit(lambda x, gx, ga, ap: lru(x, gx, ga, ap))

  @jax.jit
  def fwd_bwd(x, gx, ga, ap, ct_h, ct_last):
    _, vjp = jax.vjp(lambda *a: lru(*a), x, gx, ga, ap)
    return vjp((ct_h, ct_last))

  return fwd, fwd_bwd


def run(impls, dtypes, times, widths, batch, modes, iters, interpret, copy_bytes) -> list[dict]:
  """Runs the sweep and prints one markdown table row per configuration."""
  device = jax.devices()[0]
  copy_gbs = copy_bandwidth_gbs(copy_bytes, iters)
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"copy bandwidth (y = -x, {copy_bytes / 2**20:.0f} MiB f32): {copy_gbs:.1f} GB/s")
  print("bytes counted per position: fwd 4 elements, fwd+bwd 12 elements (see module doc)")
  print("| impl | mode | dtype | batch | time | width | ms | GB/s | of copy |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  key = jax.random.key(0)
  for dtype in dtypes:
    for seq_len in times:
      for width in widths:
        k = jax.random.split(key, 6)
        shape = (batch, seq_len, width)
        x, gx, ga, ct_h = (jax.random.normal(k[i], shape, dtype) for i in range(4))
        ap = jax.random.normal(k[4], (width,), jnp.float32)
        ct_last = jax.random.normal(k[5], (batch, width), dtype)
        for impl in impls:
          fwd, fwd_bwd = _make_fns(impl, interpret)
          for mode in modes:
            args = (x, gx, ga, ap) if mode == "fwd" else (x, gx, ga, ap, ct_h, ct_last)
            ms = _time_ms(fwd if mode == "fwd" else fwd_bwd, *args, iters=iters)
            moved = ELEMS_PER_POSITION[mode] * x.size * x.dtype.itemsize
            gbs = moved / (ms * 1e-3) / 1e9
            row = dict(
              impl=impl, mode=mode, dtype=jnp.dtype(dtype).name, batch=batch, time=seq_len,
              width=width, ms=ms, gbs=gbs, frac=gbs / copy_gbs,
            )  # fmt: skip
            rows.append(row)
            print(
              f"| {impl} | {mode} | {row['dtype']} | {batch} | {seq_len} | {width} | {ms:.3f} "
              f"| {gbs:.1f} | {row['frac']:.0%} |",
              flush=True,
            )
  return rows


def main(argv=None) -> None:
  """Parses flags and runs the benchmark."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--impls", default="pallas,xla,associative", help="comma-separated")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--times", default="8,16,32,64")
  p.add_argument("--widths", default="768,1536")
  p.add_argument("--batch", type=int, default=8 * 197)
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy reference")
  p.add_argument("--interpret", action="store_true", help="run Pallas in interpret mode (CPU)")
  p.add_argument(
    "--quick", action="store_true", help="smoke run: batch 4, time 8, width 128, 5 iterations"
  )
  a = p.parse_args(argv)
  split = lambda s: [v for v in s.split(",") if v]
  if a.quick:
    a.batch, a.times, a.widths, a.iters, a.copy_mib = 4, "8", "128", 5, 16
  run(
    impls=split(a.impls),
    dtypes=[jnp.dtype(d) for d in split(a.dtypes)],
    times=[int(t) for t in split(a.times)],
    widths=[int(w) for w in split(a.widths)],
    batch=a.batch,
    modes=split(a.modes),
    iters=a.iters,
    interpret=True if a.interpret else None,
    copy_bytes=a.copy_mib * 2**20,
  )


if __name__ == "__main__":
  main()
