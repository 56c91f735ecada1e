"""Compiled FLOPs and memory of models against the number of frames (the paper's Fig. 3).

  python -m trecvit_dist.cost --models trecvit:B,vivit:B,vivit:L --frames 8,16,32,64 \
      --mode forward|train [--image-size 224] [--batch 1] [--dtype float32] [--num-classes 400] \
      [--topology v5p:2x2x1] [--find-max-frames] --out DIR

Each model is NAME:VARIANT, optionally NAME:VARIANT:TxHxW to set model.patch_size (e.g.
vivit:L:1x16x16, ViViT with one token per frame and patch). For every model and frame count it
compiles, for the CPU host (default) or for one chip of a TPU topology (AOT, needs the tpu extra):
  forward: the model's logits for a batch of clips, parameters as arguments;
  train:   the trainer's whole train step (classification, AdamW state, the same builder).
and reads XLA's cost analysis (flops) and memory analysis (temp = activations and scratch,
arguments = parameters, optimizer state and the batch). On a topology the global batch is
--batch per chip (data parallel) and every number is per chip. Writes DIR/cost.csv with columns
model,variant,frames,mode,params,flops,temp_bytes,argument_bytes, prints the same table, and draws
DIR/cost.png: peak memory (arguments + temp) and FLOPs against frames, one line per model.
--find-max-frames (with --topology) also searches, per model, the largest number of frames whose
step fits one chip's HBM and writes DIR/max_frames.csv.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT only: no exclusive libtpu lock
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from trecvit_dist import config_base, experiment, sharding  # noqa: E402

COLUMNS = ("model", "variant", "frames", "mode", "params", "flops", "temp_bytes", "argument_bytes")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  variant: str
  patch_size: tuple[int, int, int] | None = None

  @property
  def label(self) -> str:
    patch = "" if self.patch_size is None else ":" + "x".join(map(str, self.patch_size))
    return f"{self.name}:{self.variant}{patch}"


def parse_models(text: str) -> list[ModelSpec]:
  """ "trecvit:B,vivit:L:1x16x16" -> ModelSpecs; a malformed entry names the expected form."""
  specs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    parts = item.split(":")
    if len(parts) not in (2, 3) or not all(parts):
      raise ValueError(f"--models entry {item!r}: expected NAME:VARIANT or NAME:VARIANT:TxHxW.")
    patch = None
    if len(parts) == 3:
      try:
        patch = tuple(int(p) for p in parts[2].split("x"))
      except ValueError:
        patch = ()
      if len(patch) != 3:
        raise ValueError(f"--models entry {item!r}: the patch size must be TxHxW, e.g. 1x16x16.")
    specs.append(ModelSpec(parts[0], parts[1], patch))
  if not specs:
    raise ValueError("--models is empty; e.g. --models trecvit:B,vivit:L")
  return specs


def make_config(
  spec: ModelSpec, frames: int, *, image_size: int, batch: int, dtype: str, num_classes: int
) -> ml_collections.ConfigDict:
  """A trainer config with only the model's own fields set (the family's defaults elsewhere)."""
  c = config_base.base_config()
  c.model = ml_collections.ConfigDict(
    dict(name=spec.name, variant=spec.variant, num_classes=num_classes, dtype=dtype, remat="none")
  )
  if spec.patch_size is not None:
    c.model.patch_size = spec.patch_size
  c.data.num_frames = frames
  c.data.image_size = image_size
  c.batch_size = batch
  c.eval_batch_size = batch
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


def compile_one(spec: ModelSpec, frames: int, mode: str, *, devices, batch: int, **options):
  """(compiled executable, experiment) of one model at one frame count (batch per device)."""
  config = make_config(spec, frames, batch=batch * len(devices), **options)
  mesh = sharding.make_mesh(-1, 1, 1, devices)
  exp = experiment.build(config, mesh, config.model.num_classes)
  with exp.scope():
    if mode == "train":
      lowered = exp.train_step().lower(exp.abstract_state, exp.batch_spec(config.batch_size, True))
    else:
      video = exp.batch_spec(config.batch_size, True)["video"]
      params = exp.abstract_state["params"]
      forward = jax.jit(
        lambda p, v: exp.model.apply({"params": p}, v),
        in_shardings=(exp.state_shardings["params"], video.sharding),
      )
      lowered = forward.lower(params, video)
  return lowered.compile(), exp


def measure(spec: ModelSpec, frames: int, mode: str, *, devices, **options) -> dict:
  """One row of cost.csv (per chip / per host device)."""
  compiled, exp = compile_one(spec, frames, mode, devices=devices, **options)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(
    model=spec.name,
    variant=spec.label.split(":", 1)[1],  # "L", or "L:1x16x16" with a patch size
    frames=frames,
    mode=mode,
    params=exp.num_params,
    flops=float(cost.get("flops", 0.0)),
    temp_bytes=int(memory.temp_size_in_bytes),
    argument_bytes=int(memory.argument_size_in_bytes),
    _total=int(
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
    ),
  )


def _fits(spec, frames, mode, hbm, **kw) -> tuple[bool, int | None]:
  try:
    row = measure(spec, frames, mode, **kw)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      return False, None
    raise
  return row["_total"] <= hbm, row["_total"]


def max_frames(spec: ModelSpec, mode: str, hbm: int, *, step: int, start: int, **kw):
  """Largest frame count (a multiple of `step`) whose step fits `hbm`: doubling, then bisection."""
  lo, hi, lo_bytes = 0, None, None
  frames = start
  while hi is None:
    ok, total = _fits(spec, frames, mode, hbm, **kw)
    print(
      f"  {spec.label} {mode} {frames} frames: {_gib(total)} {'fits' if ok else 'does not fit'}"
    )
    if ok:
      lo, lo_bytes, frames = frames, total, frames * 2
    else:
      hi = frames
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    if mid in (lo, hi):
      break
    ok, total = _fits(spec, mid, mode, hbm, **kw)
    print(f"  {spec.label} {mode} {mid} frames: {_gib(total)} {'fits' if ok else 'does not fit'}")
    lo, lo_bytes, hi = (mid, total, hi) if ok else (lo, lo_bytes, mid)
  return lo, lo_bytes


def _gib(x) -> str:
  return "OOM" if x is None else f"{x / 2**30:.2f} GiB"


def write_table(rows: list[dict], out: pathlib.Path) -> str:
  """Writes cost.csv and returns the printed table."""
  with (out / "cost.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  header = f"{'model':<16} {'variant':<10} {'frames':>6} {'mode':<7} {'params':>12} " + (
    f"{'GFLOPs':>12} {'temp MiB':>10} {'args MiB':>10}"
  )
  lines = [header]
  for r in rows:
    lines.append(
      f"{r['model']:<16} {r['variant']:<10} {r['frames']:>6} {r['mode']:<7} {r['params']:>12,} "
      f"{r['flops'] / 1e9:>12.1f} {r['temp_bytes'] / 2**20:>10.1f} "
      f"{r['argument_bytes'] / 2**20:>10.1f}"
    )
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
  """Peak memory (arguments + temp) and FLOPs against frames, one line per model."""
  import matplotlib  # noqa: PLC0415 (only the plot needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_mem, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
  for label in dict.fromkeys(f"{r['model']}:{r['variant']}" for r in rows):
    mine = sorted(
      (r for r in rows if f"{r['model']}:{r['variant']}" == label), key=lambda r: r["frames"]
    )
    frames = [r["frames"] for r in mine]
    ax_mem.plot(
      frames, [(r["temp_bytes"] + r["argument_bytes"]) / 2**30 for r in mine], "o-", label=label
    )
    ax_flops.plot(frames, [r["flops"] / 1e12 for r in mine], "o-", label=label)
  for ax, ylabel in ((ax_mem, "peak memory (arguments + temp), GiB"), (ax_flops, "TFLOPs")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  ax_mem.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m trecvit_dist.cost",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--models", required=True, help="NAME:VARIANT[:TxHxW],...")
  parser.add_argument("--frames", required=True, help="comma-separated frame counts")
  parser.add_argument("--mode", choices=("forward", "train"), default="forward")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=1, help="clips per device")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--num-classes", type=int, default=400)
  parser.add_argument("--topology", default="", help="e.g. v5p:2x2x1 (default: the CPU host)")
  parser.add_argument("--find-max-frames", action="store_true", help="with --topology")
  parser.add_argument("--out", required=True, help="directory for cost.csv and cost.png")
  args = parser.parse_args(argv)
  try:
    specs = parse_models(args.models)
    frames = [int(f) for f in args.frames.split(",") if f.strip()]
    if not frames or min(frames) < 1:
      raise ValueError(f"--frames must list positive integers, got {args.frames!r}.")
    if args.find_max_frames and not args.topology:
      raise ValueError("--find-max-frames needs --topology (the HBM of one chip).")
    hbm = None
    if args.topology:
      from trecvit_dist import compile_check  # noqa: PLC0415 (loads libtpu)

      devices, hbm = compile_check.topology_devices(args.topology)
      devices = devices[:1] if args.find_max_frames else devices
    else:
      devices = jax.devices()[:1]
    # Check every model's config before the first (slow) compile.
    options = dict(image_size=args.image_size, dtype=args.dtype, num_classes=args.num_classes)
    for spec in specs:
      for f in frames:
        config = make_config(spec, f, batch=args.batch, **options)
        mesh = sharding.make_mesh(-1, 1, 1, devices[:1])
        task = experiment.make_task(config, args.num_classes)
        errors = experiment.config_errors(
          config, dict(mesh.shape), task.family, task.model_cfg, task
        )
        if errors:
          raise ValueError(f"{spec.label} at {f} frames: " + "; ".join(errors) + ".")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for spec in specs:
    for f in frames:
      rows.append(measure(spec, f, args.mode, devices=devices, batch=args.batch, **options))
      print(f"  compiled {spec.label} {args.mode} {f} frames", flush=True)
  table = write_table(rows, out)
  print(table)
  where = args.topology or f"CPU host ({jax.devices()[0].device_kind})"
  plot(rows, out / "cost.png", f"{args.mode}, batch {args.batch}, {args.dtype}, {where}")
  print(f"wrote {out / 'cost.csv'} and {out / 'cost.png'}")
  if args.find_max_frames:
    with (out / "max_frames.csv").open("w") as f:
      f.write("model,variant,mode,max_frames,total_bytes,hbm_bytes\n")
      for spec in specs:
        cfg = experiment.make_task(
          make_config(spec, frames[0], batch=args.batch, **options), args.num_classes
        ).model_cfg
        step = getattr(cfg, "patch_size", (1,))[0]
        best, total = max_frames(
          spec,
          args.mode,
          hbm,
          step=step,
          start=frames[0],
          devices=devices,
          batch=args.batch,
          **options,
        )
        print(f"{spec.label} {args.mode}: at most {best} frames fit one chip ({_gib(total)})")
        variant = spec.label.split(":", 1)[1]
        f.write(f"{spec.name},{variant},{args.mode},{best},{total},{hbm}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
