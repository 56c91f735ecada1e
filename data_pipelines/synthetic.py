"""The embedded default dataset: a shape moving left / right / up / down over a random background.

  python -m data_pipelines.synthetic --out DIR --split NAME --num-videos N \
      [--frames 16] [--size 32] [--seed 0] [--num-shards 4]

writes DIR/{split}.array_record-*, DIR/classes.txt and DIR/{split}.summary.json in the record
format of records.py (frames uint8 [T, S, S, 3], JPEG), so the real pipeline reads it.

The class is defined only by motion over time: one bright square or disc of random colour and
size moves by a random 1/16..1/10 of the frame per frame in its class direction, wrapping around
the borders (a torus). Its start position is uniform over the frame, so the position in every
single frame is uniform and independent of the class, as are the colours, shape, size and the
random smooth background; a model seeing one frame is at chance (tested), two frames suffice.

Classes (classes.txt order): left, right, up, down. Horizontal flip swaps left and right, so
train on it with flip=False. Labels cycle through the classes (balanced splits); every video is
a pure function of (seed, split, index), so splits generated with different seeds (or split
names) are disjoint and regeneration is byte-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib

import numpy as np
from etils import epath

from data_pipelines import labels as labels_lib
from data_pipelines import records, shards

CLASSES = ("left", "right", "up", "down")
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 32
FPS = 10.0


def make_video(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
  """One video uint8 [frames, size, size, 3] whose motion direction is CLASSES[label]."""
  # Smooth random background: a 4x4 random field upsampled, dark so the shape stands out. Kept
  # dark on purpose: the RG-LRU's first step is un-normalised (m_0 = 1), so a bright background
  # in frame 0 dominates slow recurrent channels; with a 0..110 background the tiny model needs
  # far more than the 300 steps synthetic_tiny budgets (measured: chance after 400 steps).
  coarse = rng.uniform(0, 16, size=(4, 4, 3))
  ramp = np.linspace(0, 3, size)
  iy, ix = np.meshgrid(ramp, ramp, indexing="ij")
  y0, x0 = np.floor(iy).astype(int).clip(0, 2), np.floor(ix).astype(int).clip(0, 2)
  fy, fx = (iy - y0)[..., None], (ix - x0)[..., None]
  background = (
    coarse[y0, x0] * (1 - fy) * (1 - fx)
    + coarse[y0 + 1, x0] * fy * (1 - fx)
    + coarse[y0, x0 + 1] * (1 - fy) * fx
    + coarse[y0 + 1, x0 + 1] * fy * fx
  )
  background += rng.normal(0, 6, size=background.shape)

  colour = rng.uniform(170, 255, size=3)
  radius = rng.uniform(size / 9, size / 6)
  square = rng.random() < 0.5
  speed = rng.uniform(size / 16, size / 10)
  dy, dx = _DIRECTIONS[CLASSES[label]]
  cy, cx = rng.uniform(0, size, size=2)

  grid = np.arange(size) + 0.5
  video = np.empty((frames, size, size, 3), np.uint8)
  for t in range(frames):
    # Distances on the torus so the shape wraps around instead of leaving the frame.
    ddy = (grid[:, None] - (cy + dy * speed * t) + size / 2) % size - size / 2
    ddx = (grid[None, :] - (cx + dx * speed * t) + size / 2) % size - size / 2
    if square:
      inside = (np.abs(ddy) <= radius) & (np.abs(ddx) <= radius)
    else:
      inside = ddy**2 + ddx**2 <= radius**2
    video[t] = np.where(inside[..., None], colour, background).clip(0, 255).astype(np.uint8)
  return video


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def generate(
  out_dir: str,
  split: str,
  num_videos: int,
  frames: int = DEFAULT_FRAMES,
  size: int = DEFAULT_SIZE,
  seed: int = 0,
  *,
  num_shards: int = 4,
) -> dict:
  """Writes the split to out_dir (shards, classes.txt, summary); returns the summary."""
  if num_videos < 1 or frames < 2 or size < 8:
    raise ValueError(
      f"Need num_videos >= 1, frames >= 2, size >= 8; got {num_videos}, {frames}, {size}."
    )
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  classes_path = out / labels_lib.CLASSES_FILE
  if classes_path.exists():
    if labels_lib.read_classes_file(classes_path) != list(CLASSES):
      raise ValueError(f"{classes_path} exists with other classes; use another --out directory.")
  else:
    shards.write_text_atomic(classes_path, "".join(f"{c}\n" for c in CLASSES))
  num_shards = max(1, min(num_shards, num_videos))
  for stale in shards.existing_shard_counts(out, split):
    if stale != num_shards:
      raise ValueError(f"{out} holds a {stale}-shard copy of split {split!r}; delete it first.")

  per_shard = []
  for s in range(num_shards):
    with shards.AtomicShardWriter(out / shards.shard_name(split, s, num_shards)) as writer:
      for i in range(s * num_videos // num_shards, (s + 1) * num_videos // num_shards):
        label = i % len(CLASSES)
        video = make_video(_rng(seed, split, i), label, frames, size)
        writer.write(
          records.encode(
            video, video_id=f"{split}-{i:07d}", fps=FPS, label=label, label_name=CLASSES[label]
          )
        )
    per_shard.append(writer.num_records)
  summary = dict(
    split=split,
    schema_version=records.SCHEMA_VERSION,
    num_shards=num_shards,
    converted=num_videos,
    skipped=[],
    num_skipped=0,
    records_per_shard=per_shard,
    num_classes=len(CLASSES),
    synthetic=dict(frames=frames, size=size, seed=seed),
  )
  shards.write_text_atomic(out / f"{split}.summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def ensure(
  out_dir: str,
  *,
  num_train: int = 2048,
  num_validation: int = 512,
  frames: int = DEFAULT_FRAMES,
  size: int = DEFAULT_SIZE,
  seed: int = 0,
) -> None:
  """Generates the `train` and `validation` splits into out_dir unless already complete.

  Safe to call from every process of a multi-process job on a shared directory: the bytes are a
  function of the arguments and every file appears by an atomic rename.
  """
  for split, n, split_seed in (
    ("train", num_train, seed),
    ("validation", num_validation, seed + 1),
  ):
    # The summary is written last, so its presence marks a complete split.
    if not (epath.Path(out_dir) / f"{split}.summary.json").exists():
      generate(out_dir, split, n, frames, size, split_seed)


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--split", required=True)
  parser.add_argument("--num-videos", type=int, required=True)
  parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
  parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-shards", type=int, default=4)
  args = parser.parse_args(argv)
  generate(
    args.out,
    args.split,
    args.num_videos,
    args.frames,
    args.size,
    args.seed,
    num_shards=args.num_shards,
  )
  print(f"wrote {args.num_videos} videos of split {args.split!r} to {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
