"""Official TRecViT checkpoints: import the release layout, `predict` on it, `export` to it.

The release stores one array per parameter in an .npz, keyed by the flax path joined with "/"
(tokenizer/..., encoder/..., decoder/...). Our module tree uses the same names, so importing is a
path-by-path copy, checked against the shapes our model expects (`import_params`, which lives
with the model in models/trecvit.py and is re-exported here with `load_npz`), and exporting is
the same copy the other way.

  python -m trecvit_dist.official predict --params P.npz --config C.json --video V.npy --out O.npz \
      [--frame-by-frame]
  python -m trecvit_dist.official export --workdir W --out P.npz --config-out C.json \
      [--encoder-only]

`export` writes the workdir's newest checkpoint's parameters (only those: no optimizer state) in
the release layout, and a config JSON with the keys of
tests/fixtures/official_trecvit/tiny_config.json (frames_per_clip = frames = the run's
data.num_frames, image = data.image_size, batch 1), which `predict` above and the official model
code read. Only what the official model computes exports: model.name=trecvit, a TRecViT classifier
(task=classification), and no setting the official config has no key for (posemb, pooling,
max_rad, lru_c, temporal_blocks, ...) away from the official value; compute dtype, remat and
kernel choice do not matter (the export runs in float32). Tasks around a TRecViT encoder (mae,
readout) export with --encoder-only: tokenizer/ and encoder/ only, which `init_from=P.npz` loads
(their heads, our MAE decoder and the readout, have no release layout; the official MAE release's
decoder is another module). A run trained on normalised input (data.mean / data.std) has the
normalisation folded into the patch embedding, so the export takes [0, 1] video like the
official model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import flax
import ml_collections
import numpy as np
from etils import epath

from trecvit_dist import experiment, inference
from trecvit_dist.init_from import load_npz
from trecvit_dist.models import TRecViT, TRecViTConfig, from_official_json
from trecvit_dist.models.trecvit import (
  ENCODER_PREFIXES,
  expected_shapes,
  import_encoder,
  import_params,
)

__all__ = ["expected_shapes", "export", "import_params", "load_npz", "main"]

# The official config's keys (tests/fixtures/official_trecvit/tiny_config.json), in its order.
OFFICIAL_CONFIG_KEYS = (
  "width",
  "depth",
  "mlp_dim",
  "num_heads",
  "patch_size",
  "conv1d_temporal_width",
  "state_multiplier",
  "min_rad",
  "num_classes",
  "rep_size",
  "frames_per_clip",
  "frames",
  "image",
  "batch",
)
# TRecViTConfig fields that official config keys set.
_OFFICIAL_FIELDS = OFFICIAL_CONFIG_KEYS[:11]
# Fields that change how a model runs, not what it computes (the export runs in float32).
_RUNTIME_FIELDS = ("dtype", "remat", "lru_impl", "classifier_dropout")


# ----------------------------------------------------------------------------- export


def unofficial_settings(cfg: TRecViTConfig) -> list[str]:
  """The settings of cfg that the official model cannot express, as "field=value (official: x)"."""
  official = TRecViTConfig()
  found = []
  for field in dataclasses.fields(TRecViTConfig):
    name = field.name
    if name in _OFFICIAL_FIELDS + _RUNTIME_FIELDS or name == "lru_num_heads":
      continue
    if getattr(cfg, name) != getattr(official, name):
      found.append(f"{name}={getattr(cfg, name)!r} (official: {getattr(official, name)!r})")
  if cfg.gate_heads != cfg.num_heads:  # the official gates have one block per attention head
    found.append(f"lru_num_heads={cfg.lru_num_heads} (official: num_heads={cfg.num_heads})")
  return found


def official_config(cfg: TRecViTConfig, num_frames: int, image_size: int) -> dict:
  """The config JSON of an export, with the keys of the fixture's tiny_config.json."""
  values = {name: getattr(cfg, name) for name in _OFFICIAL_FIELDS}
  values["patch_size"] = list(cfg.patch_size)
  values.update(frames=num_frames, image=image_size, batch=1)
  return {k: values[k] for k in OFFICIAL_CONFIG_KEYS}


def fold_input_normalisation(flat: dict[str, np.ndarray], mean, std) -> dict[str, np.ndarray]:
  """Parameters taking [0, 1] video, from ones trained on (video - mean) / std (None: 0 / 1).

  The patch embedding is linear over whole patches (VALID padding), so
  conv(W, (x - m) / s) + b = conv(W / s, x) + (b - sum over the patch of W m / s).
  """
  kernel = np.asarray(flat["tokenizer/embedding/kernel"], np.float64)  # [pt, ph, pw, 3, c]
  m = np.broadcast_to(np.asarray(0.0 if mean is None else mean, np.float64), (3,))
  s = np.broadcast_to(np.asarray(1.0 if std is None else std, np.float64), (3,))
  bias = flat["tokenizer/embedding/bias"] - np.einsum("thwic,i->c", kernel, m / s)
  return {
    **flat,
    "tokenizer/embedding/kernel": (kernel / s[:, None]).astype(np.float32),
    "tokenizer/embedding/bias": bias.astype(np.float32),
  }


def check_exportable(config: ml_collections.ConfigDict, workdir: str, encoder_only: bool) -> None:
  """ValueError (one line, with the fix) when the run has nothing the release layout can hold."""
  name = config.model.get("name") or "trecvit"
  if name != "trecvit":
    raise ValueError(
      f"{workdir} holds model.name={name}; only TRecViT has an official release layout. Use the "
      f"workdir itself (python -m trecvit_dist.predict --workdir {workdir}, or init_from)."
    )
  task = experiment.make_task(config, 1)
  if not encoder_only and not isinstance(task.build_model(), TRecViT):
    raise ValueError(
      f"{workdir} was trained with task={task.name}, whose model is not a TRecViT classifier: "
      "its head has no official layout. Pass --encoder-only to export tokenizer/ and encoder/ "
      "(loadable with init_from)."
    )
  unofficial = unofficial_settings(task.model_cfg)
  if unofficial:
    raise ValueError(
      f"{workdir}'s model has settings the official model cannot express: "
      f"{', '.join(unofficial)}; the export would compute something else. Train with the "
      "official values to export."
    )


def export(workdir: str, out: str, config_out: str, *, encoder_only: bool = False) -> str:
  """Writes a trained workdir's TRecViT in the release layout (see the module docstring);
  returns a one-line summary. ValueError naming the problem when it cannot be exported."""
  _, config = inference.read_config(workdir)
  check_exportable(config, workdir, encoder_only)
  trained = inference.load_trained(
    workdir, config, prefixes=ENCODER_PREFIXES if encoder_only else ()
  )
  cfg, d = trained.task.model_cfg, config.data
  flat = {
    k: np.asarray(v, np.float32)
    for k, v in flax.traverse_util.flatten_dict(trained.params, sep="/").items()
  }
  # The layout the official model expects for this config, key by key and shape by shape.
  size = (d.image_size, d.image_size)
  if encoder_only:
    import_encoder(flat, cfg, size)
  else:
    import_params(flat, cfg, size)
  if d.get("mean") is not None or d.get("std") is not None:
    flat = fold_input_normalisation(flat, d.get("mean"), d.get("std"))
  out_path, config_path = epath.Path(out), epath.Path(config_out)
  for path in (out_path, config_path):
    path.parent.mkdir(parents=True, exist_ok=True)
  with out_path.open("wb") as f:
    np.savez(f, **flat)
  config_path.write_text(
    json.dumps(official_config(cfg, d.num_frames, d.image_size), indent=1) + "\n"
  )
  num_params = sum(v.size for v in flat.values())
  return (
    f"wrote {out_path} ({len(flat)} arrays, {num_params / 1e6:.2f}M parameters"
    f"{', encoder only' if encoder_only else ''}; step {trained.step} of {workdir}) and "
    f"{config_path}"
  )


# ----------------------------------------------------------------------------- command line


def _parse(argv):
  parser = argparse.ArgumentParser(
    prog="python -m trecvit_dist.official",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("predict", help="run an official-layout checkpoint on a video array")
  p.add_argument("--params", required=True, help="official-layout .npz of parameters")
  p.add_argument("--config", required=True, help="JSON with the keys of tiny_config.json")
  p.add_argument("--video", required=True, help=".npy float32 [b, t, h, w, 3] in [0, 1]")
  p.add_argument("--out", required=True, help=".npz to write: logits, probs, encoded")
  p.add_argument("--frame-by-frame", action="store_true", help="one frame at a time, carried state")
  e = sub.add_parser("export", help="write a trained workdir's TRecViT in the release layout")
  e.add_argument("--workdir", required=True, help="a trained run's workdir")
  e.add_argument("--out", required=True, help=".npz of parameters to write")
  e.add_argument("--config-out", required=True, help="config .json to write")
  e.add_argument(
    "--encoder-only", action="store_true", help="only tokenizer/ and encoder/ (mae, readout)"
  )
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  if args.command == "export":
    try:
      print(export(args.workdir, args.out, args.config_out, encoder_only=args.encoder_only))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  with epath.Path(args.config).open() as f:
    cfg = from_official_json(json.load(f))
  video = np.load(args.video)
  if video.dtype != np.float32:
    video = video.astype(np.float32)
  inference.check_video(cfg, video.shape)  # before any compilation
  params = import_params(load_npz(args.params), cfg, video.shape[2:4])
  if args.frame_by_frame:
    out = inference.predict_frame_by_frame(cfg, params, video)
  else:
    out = inference.predict(cfg, params, video)
  out = {k: np.asarray(out[k]) for k in ("logits", "probs", "encoded")}
  out_path = epath.Path(args.out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with out_path.open("wb") as f:
    np.savez(f, **out)
  top = np.argmax(out["probs"], axis=-1)
  print(f"wrote {out_path}: logits {out['logits'].shape}, top-1 classes {top.tolist()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
