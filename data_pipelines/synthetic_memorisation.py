"""Synthetic data for the memorisation task: a camera panning over large textures, with scene cuts.

  python -m data_pipelines.synthetic --kind memorisation --out DIR --split NAME --num-videos N \
      [--frames 64] [--size 32] [--param min_shot=6] [--param max_shot=24]

The task reconstructs the frame seen k steps ago from the last step's output, so the recent frames
must not give it away. Each video (uint8 [T, S, S, 3]; unlabelled: label -1, empty classes.txt)
is a sequence of shots of min_shot..max_shot frames (uniform; the last one is cut at T). In a shot
an S x S camera window moves in a straight line at a constant S/32..S/10 pixels per frame, in a
uniform direction, over the shot's own texture (`synthetic.random_texture`: multi-scale coloured
1/f noise under random shapes of random colours, log-uniform radii S/16..S/2), sampled bilinearly
(sub-pixel pans). The texture is made just large enough for the window's path (up to
S + max_shot * S/10 pixels, 3.4 S with the defaults), so the camera never sees a place twice. A
cut switches to a new texture, position, direction and speed.

Measured on the defaults (tests/data_pipelines/test_synthetic_memorisation.py): frames 4, 8 and 16
steps apart within a shot differ by 0.52, 0.65 and 0.72 of the mean absolute difference between
unrelated frames, across a cut by 0.92; copying the last frame of a clip predicts the frame k
steps back only 2.0, 1.5 and 0.1 dB better (PSNR) than another video's frame would. 64 frames of
32x32 (the defaults) leave room for clips of up to 32 frames with offsets up to 16 from anywhere
in the video. Every video is a pure function of (seed, split, index) and the parameters.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import synthetic

DEFAULT_FRAMES = 64
DEFAULT_SIZE = 32
DEFAULT_PARAMS = {"min_shot": 6, "max_shot": 24}


def check_params(frames: int, size: int, *, min_shot: int, max_shot: int):
  """Raises ValueError naming the problem when the parameters cannot make sensible videos."""
  if not 1 <= min_shot <= max_shot:
    raise ValueError(
      f"Need 1 <= min_shot <= max_shot; got min_shot={min_shot}, max_shot={max_shot}."
    )


def make_video(
  rng: np.random.Generator,
  frames: int,
  size: int,
  *,
  min_shot: int,
  max_shot: int,
) -> dict[str, np.ndarray]:
  """dict(frames=uint8 [frames, size, size, 3], shot_starts=int [num_shots]) of one video."""
  video = np.empty((frames, size, size, 3), np.uint8)
  start, shot_starts = 0, []
  while start < frames:
    shot_starts.append(start)
    length = min(int(rng.integers(min_shot, max_shot + 1)), frames - start)
    speed = rng.uniform(size / 32, size / 10)
    angle = rng.uniform(0, 2 * np.pi)
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    # The shot's world: a texture just large enough for the window's path (it never wraps).
    height = int(np.ceil(size + abs(vy) * (length - 1))) + 2
    width = int(np.ceil(size + abs(vx) * (length - 1))) + 2
    texture = synthetic.random_texture(rng, height, width, scale=size)
    # The window's top-left corner per frame, from the texture's corner the path starts at.
    top = (0 if vy >= 0 else height - size - 1) + vy * np.arange(length)
    left = (0 if vx >= 0 else width - size - 1) + vx * np.arange(length)
    for t in range(length):
      shot = synthetic.window(texture, top[t], left[t], size, size)
      video[start + t] = np.clip(np.rint(shot), 0, 255).astype(np.uint8)
    start += length
  return dict(frames=video, shot_starts=np.array(shot_starts))
