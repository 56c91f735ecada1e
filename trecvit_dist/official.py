"""Official TRecViT checkpoints: import the release layout, and a `predict` command line.

The release stores one array per parameter in an .npz, keyed by the flax path joined with "/"
(tokenizer/..., encoder/..., decoder/...). Our module tree uses the same names, so importing is a
path-by-path copy, checked against the shapes our model expects.

  python -m trecvit_dist.official predict --params P.npz --config C.json --video V.npy --out O.npz \
      [--frame-by-frame]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from trecvit_dist import inference
from trecvit_dist.models import TRecViT, TRecViTConfig, from_official_json

Params = Any


def expected_shapes(cfg: TRecViTConfig, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
  """Flat {"a/b/c": shape} of the parameters our model has for this config and image size."""
  video = jax.ShapeDtypeStruct((1, cfg.patch_size[0], *image_size, 3), jnp.float32)
  variables = jax.eval_shape(TRecViT(cfg).init, jax.random.key(0), video)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def load_npz(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """Reads an official-layout .npz into a flat {path: array} dict."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Official checkpoint {path} does not exist.")
  try:
    with path.open("rb") as f, np.load(f) as npz:
      return {k: np.asarray(npz[k]) for k in npz.files}
  except Exception as e:  # noqa: BLE001 (a corrupt npz raises many kinds of error)
    raise ValueError(f"Could not read {path} as an .npz of parameters: {e}") from e


def import_params(
  flat: Mapping[str, np.ndarray],
  cfg: TRecViTConfig,
  image_size: tuple[int, int],
  *,
  ignore_prefixes: Iterable[str] = (),
  allow_missing_prefixes: Iterable[str] = (),
) -> Params:
  """Official flat params -> our nested params; lists every missing, unexpected or mis-shaped key.

  ignore_prefixes: checkpoint keys to drop silently (e.g. an MAE pixel decoder when only the
  encoder is wanted). allow_missing_prefixes: our keys that may stay absent (the caller
  initialises them, e.g. a new classifier head).
  """
  expected = expected_shapes(cfg, image_size)
  ignore, allow_missing = tuple(ignore_prefixes), tuple(allow_missing_prefixes)
  given = {k: v for k, v in flat.items() if not (ignore and k.startswith(ignore))}
  missing = sorted(
    k for k in expected if k not in given and not (allow_missing and k.startswith(allow_missing))
  )
  unexpected = sorted(k for k in given if k not in expected)
  misshaped = sorted(
    f"{k}: checkpoint {tuple(given[k].shape)} vs model {expected[k]}"
    for k in given
    if k in expected and tuple(given[k].shape) != expected[k]
  )
  if missing or unexpected or misshaped:
    lines = ["The checkpoint does not match the model config:"]
    for title, keys in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if keys:
        lines.append(f"  {len(keys)} {title} key(s):")
        lines += [f"    {k}" for k in keys]
    lines.append(
      "Check the config (width, depth, heads, mlp_dim, patch_size, state_multiplier, "
      "conv1d_temporal_width, rep_size, num_classes, image size for pos_embedding)."
    )
    raise ValueError("\n".join(lines))
  kept = {tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in given.items()}
  return flax.traverse_util.unflatten_dict(kept)


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
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
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
