"""Benchmark of async checkpoint saves: how long the loop blocks vs when the save is complete.

  python -m trecvit_dist.checkpoint_bench [--variant B] [--saves 3] [--dir DIR]

Builds the real train state (params + Adam moments) of configs/trecvit_k400.py's model with the
trainer's builder, fills it with random values (a constant state would compress to nothing), and
saves it `saves` times through the trainer's Checkpointer.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time

import jax
import numpy as np

from trecvit_dist import checkpointing, config_base, experiment, sharding


def bench(workdir: str, *, variant: str = "B", saves: int = 3) -> list[tuple[float, float]]:
  """Per save: (ms the caller was blocked, seconds until the checkpoint was complete on disk)."""
  config = config_base.base_config()
  config.model.variant = variant
  config.data.num_frames = 32
  mesh = sharding.make_mesh(1, -1, 1, None)  # parameters sharded over every device (FSDP)
  exp = experiment.build(config, mesh, num_classes=400)
  shapes = exp.abstract_state

  def fill(key):
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
      [
        jax.random.normal(k, s.shape, s.dtype)
        if np.issubdtype(s.dtype, np.floating)
        else np.zeros(s.shape, s.dtype)
        for k, s in zip(keys, leaves, strict=True)
      ]
    )

  state = jax.jit(fill, out_shardings=exp.state_shardings)(jax.random.key(0))
  jax.block_until_ready(state)
  num_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  logging.info(
    "%s-%s state: %.1fM params, %.2f GB",
    exp.family.name,
    variant,
    exp.num_params / 1e6,
    num_bytes / 1e9,
  )
  print(
    f"state: {exp.family.name}-{variant}, {exp.num_params / 1e6:.1f}M params, "
    f"{num_bytes / 1e9:.2f} GB, {len(jax.tree.leaves(state))} arrays on {mesh.size} device(s)",
    flush=True,
  )
  ckpt = checkpointing.Checkpointer(workdir, every_steps=1, keep=1)
  results = []
  for step in range(1, saves + 1):
    start = time.perf_counter()
    ckpt.save(step, state, {"next_position": step}, {})
    ckpt.wait()
    total = time.perf_counter() - start
    results.append((ckpt.blocking_ms[-1], total))
    print(
      f"save {step}: blocking {ckpt.blocking_ms[-1]:.0f} ms, complete after {total:.2f} s "
      f"({100 * ckpt.blocking_ms[-1] / 1e3 / total:.1f}% blocking)",
      flush=True,
    )
  ckpt.close()
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--variant", default="B", help="TRecViT size (B: ~1.6 GB state)")
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
  args = parser.parse_args(argv)
  workdir = args.dir or tempfile.mkdtemp(prefix="trecvit_ckpt_bench_")
  try:
    results = bench(workdir, variant=args.variant, saves=args.saves)
  finally:
    if not args.dir:
      shutil.rmtree(workdir, ignore_errors=True)
  later = results[1:] or results
  blocking = float(np.median([b for b, _ in later]))
  total = float(np.median([t for _, t in later]))
  print(
    f"median of saves 2..{len(results)}: blocking {blocking:.0f} ms of {total:.2f} s per save "
    f"= {100 * blocking / 1e3 / total:.1f}%"
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
