"""Official TRecViT checkpoints: import the release layout, and a `predict` command line.

The release stores one array per parameter in an .npz, keyed by the flax path joined with "/"
(tokenizer/..., encoder/..., decoder/...). Our module tree uses the same names, so importing is a
path-by-path copy, checked against the shapes our model expects (`import_params`, which lives
with the model in models/trecvit.py and is re-exported here with `load_npz`).

  python -m trecvit_dist.official predict --params P.npz --config C.json --video V.npy --out O.npz \
      [--frame-by-frame]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from etils import epath

from trecvit_dist import inference
from trecvit_dist.init_from import load_npz
from trecvit_dist.models import from_official_json
from trecvit_dist.models.trecvit import expected_shapes, import_params

__all__ = ["expected_shapes", "import_params", "load_npz", "main"]


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
