"""AOT-compiles the sharded train step for a TPU topology on a CPU host (needs libtpu).

  python -m trecvit_dist.compile_check --config configs/trecvit_k400.py:B --topology v5p:4x4x4 \
      [--chips N] [--batch_size N] [--find_max_batch] [--num_classes 400] [--config.FIELD=VALUE ...]

--chips N compiles for the first N chips of the topology (e.g. one chip of v5p:2x2x1). The mesh is
config.mesh (data, fsdp, tensor and time: --config.mesh.time=8 shards the frames over 8 chips).

Prints per-chip argument / temp / output / total memory against the chip's HBM and the step's
FLOPs; exits 1 when the step does not fit. --find_max_batch doubles the global batch, then
bisects, to report the largest batch (a multiple of the data-parallel size) that fits.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# AOT compilation only: don't take libtpu's single-process lock (tests and a second check may run).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from trecvit_dist import experiment, sharding  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology, e.g. v5p:4x4x4, v5e:4x4")
_BATCH = flags.DEFINE_integer("batch_size", None, "global batch (default: the config's)")
_FIND_MAX = flags.DEFINE_boolean("find_max_batch", False, "search the largest batch that fits")
_CHIPS = flags.DEFINE_integer("chips", None, "use the first N chips of the topology (default: all)")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 400, "classes when model.num_classes is unset")

# HBM per chip in bytes (public figures).
HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30}
CHIPS_PER_HOST = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2, 1), "v6e": (2, 2, 1)}


def topology_devices(topology: str):
  """TPU devices of a topology such as "v5p:4x4x4", usable for AOT compilation on a CPU host."""
  generation = topology.split(":")[0]
  if generation not in HBM_BYTES:
    raise ValueError(f"Unknown TPU generation in {topology!r}; known: {sorted(HBM_BYTES)}.")
  bounds = CHIPS_PER_HOST[generation]
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology,
      chip_config_name="default",
      chips_per_host_bounds=bounds,
      num_slices=1,
    )
  except Exception as e:  # noqa: BLE001
    raise RuntimeError(
      f"Could not get TPU topology {topology} ({e}). "
      "Install the tpu extra: pip install -e '.[tpu]'."
    ) from e
  return desc.devices, HBM_BYTES[generation]


def compile_step(config, devices, batch_size: int, num_classes: int):
  """Lowers and compiles the real sharded train step; returns (compiled, mesh, experiment).

  The config is checked exactly as the trainer checks it (experiment.build), before compiling.
  """
  mesh = sharding.mesh_from_config(config.mesh, devices)
  with config.unlocked():
    config.batch_size = batch_size
  exp = experiment.build(config, mesh, num_classes)
  with exp.scope():
    step = exp.train_step()
    compiled = step.lower(exp.abstract_state, exp.batch_spec(batch_size, train=True)).compile()
  return compiled, mesh, exp


def report(compiled, hbm: int) -> tuple[int, dict]:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  total -= m.alias_size_in_bytes  # donated state: outputs reuse the arguments' buffers
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return total, dict(
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    temp=m.temp_size_in_bytes,
    alias=m.alias_size_in_bytes,
    total=total,
    hbm=hbm,
    flops=float(cost.get("flops", 0.0)),
  )


def _gib(x):
  return f"{x / 2**30:.2f} GiB"


def main(argv):
  del argv
  config = _CONFIG.value
  devices, hbm = topology_devices(_TOPOLOGY.value)
  if _CHIPS.value is not None:
    if not 1 <= _CHIPS.value <= len(devices):
      raise app.UsageError(f"--chips must be in [1, {len(devices)}] for {_TOPOLOGY.value}.")
    devices = devices[: _CHIPS.value]
  num_classes = config.model.num_classes or _NUM_CLASSES.value
  batch = _BATCH.value or config.batch_size

  def fits(b):
    try:
      compiled, mesh, exp = compile_step(config, devices, b, num_classes)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The TPU compiler refuses programs whose buffers exceed HBM: that is "does not fit".
      print(f"  batch {b}: the TPU compiler ran out of HBM: {str(e).splitlines()[0][:300]}")
      return False, None, None
    total, r = report(compiled, hbm)
    return total <= hbm, r, exp

  ok, r, exp = fits(batch)
  if r is None:
    print(
      f"DOES NOT FIT: global batch {batch} needs more than the {_gib(hbm)} of HBM per chip. "
      "Lower batch_size, enable model.remat, or raise mesh.fsdp."
    )
    sys.exit(1)
  mesh = exp.mesh
  analytic = exp.train_flops_per_clip()
  print(
    f"topology {_TOPOLOGY.value}: {len(devices)} chips, mesh {dict(mesh.shape)}, "
    f"global batch {batch}, {config.data.num_frames} frames at {config.data.image_size}px"
  )
  print(
    f"per-chip memory: arguments {_gib(r['argument'])}, outputs {_gib(r['output'])}, "
    f"temp {_gib(r['temp'])}, aliased {_gib(r['alias'])}, total {_gib(r['total'])} "
    f"of {_gib(hbm)} HBM ({100 * r['total'] / hbm:.1f}%)"
  )
  print(
    f"step FLOPs per chip (XLA cost analysis): {r['flops']:.4g}; analytic model FLOPs per "
    f"chip: {analytic * batch / len(devices):.4g}"
  )
  if _FIND_MAX.value:
    unit = sharding.batch_divisor(mesh) * max(1, config.grad_accum_steps)
    lo, hi = (batch, None) if ok else (0, batch)
    while hi is None:
      candidate = lo * 2
      fit, r2, _ = fits(candidate)
      if r2:
        print(f"  batch {candidate}: {_gib(r2['total'])} {'fits' if fit else 'does not fit'}")
      lo, hi = (candidate, None) if fit else (lo, candidate)
    while hi - lo > unit:
      mid = (lo + hi) // 2 // unit * unit
      if mid in (lo, hi):
        break
      fit, r2, _ = fits(mid)
      if r2:
        print(f"  batch {mid}: {_gib(r2['total'])} {'fits' if fit else 'does not fit'}")
      lo, hi = (mid, hi) if fit else (lo, mid)
    print(f"largest global batch that fits: {lo}")
  if not ok:
    print(
      f"DOES NOT FIT: {_gib(r['total'])} > {_gib(hbm)} per chip. Lower batch_size, enable "
      "model.remat, or raise mesh.fsdp."
    )
    sys.exit(1)
  print("fits")


if __name__ == "__main__":
  app.run(main)
