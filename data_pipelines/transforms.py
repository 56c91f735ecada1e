"""Per-video sampling and augmentation, numpy/PIL on uint8 frames.

Temporal sampling: a clip is `num_frames` frame indices `start + i * stride`. A video shorter
than the clip span `(num_frames - 1) * stride + 1` is looped (indices mod T, start 0), so every
clip has the requested length and a 1-frame video gives a still clip.

Spatial geometry, with frames stored at short side S0 (256 by default) and `base =
image_size / 0.875` (256 for 224, the usual "resize to 256, crop 224"):
- train: the short side is resized to `s * base`, s ~ U(scale_jitter) (0.875..1.33: 224..341
  for 224), then a random image_size^2 crop. Done as one resample of the equivalent box of the
  stored frame (PIL `resize(box=...)`), never resizing the whole frame.
- eval, 1 crop: short side resized to `base`, centre crop (the s = 1 train view).
- eval, n >= 2 crops: short side resized to image_size, n crops evenly spaced along the long
  side (3: left/centre/right or top/centre/bottom), as in ViViT/TRecViT 3-crop evaluation.

Shapes: frames uint8 [T, H, W, 3] -> clip uint8 [num_frames, image_size, image_size, 3].

Point tracks (x, y) follow the frames: `transform_points` maps them through the same box (and a
horizontal flip) into output pixels, with pixel j covering [j, j + 1) as in PIL's resize box, so
a point stays on the same image content; points that leave the output become occluded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

CROP_RATIO = 0.875  # image_size / short side for the single centre crop (224 / 256)
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in stored-frame pixels


def clip_span(num_frames: int, stride: int) -> int:
  """Number of source frames a clip covers."""
  return (num_frames - 1) * stride + 1


def clip_indices(num_video_frames: int, num_frames: int, stride: int, start: int) -> np.ndarray:
  """Frame indices of one clip; looped (mod T) when the video is shorter than the span."""
  return (start + np.arange(num_frames) * stride) % num_video_frames


def random_start(rng: np.random.Generator, num_video_frames: int, span: int) -> int:
  """Uniform clip start over the whole video; 0 when the video is shorter than the span."""
  return int(rng.integers(0, num_video_frames - span + 1)) if num_video_frames >= span else 0


def eval_starts(num_video_frames: int, span: int, num_clips: int) -> list[int]:
  """num_clips starts evenly spaced from the first to the last possible start."""
  last = max(0, num_video_frames - span)
  return [int(round(x)) for x in np.linspace(0, last, num_clips)]


def train_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  image_size: int,
  scale_jitter: tuple[float, float],
) -> Box:
  """Random scale-jittered crop box (a square of the stored frame)."""
  scale = rng.uniform(*scale_jitter)
  short_side = max(image_size, scale * image_size / CROP_RATIO)
  side = min(height, width, image_size * min(height, width) / short_side)
  top = rng.uniform(0, height - side)
  left = rng.uniform(0, width - side)
  return (left, top, left + side, top + side)


def eval_boxes(height: int, width: int, image_size: int, num_crops: int) -> list[Box]:
  """Deterministic crop boxes for evaluation (see module docstring)."""
  short = min(height, width)
  if num_crops == 1:
    side = short * CROP_RATIO
    top, left = (height - side) / 2, (width - side) / 2
    return [(left, top, left + side, top + side)]
  boxes = []
  for offset in np.linspace(0, max(height, width) - short, num_crops):
    top, left = (offset, 0.0) if height > width else (0.0, offset)
    boxes.append((left, top, left + short, top + short))
  return boxes


def crop_resize(
  frames_THW3: np.ndarray, box: Box, image_size: int, out: np.ndarray | None = None
) -> np.ndarray:
  """Resamples the box of every frame to [T, image_size, image_size, 3] (bilinear, antialiased)."""
  if out is None:
    out = np.empty((len(frames_THW3), image_size, image_size, 3), np.uint8)
  for t, frame in enumerate(frames_THW3):
    img = Image.fromarray(frame)
    out[t] = np.asarray(img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box))
  return out


def transform_points(
  tracks_QT2: np.ndarray,
  occluded_QT: np.ndarray,
  box: Box,
  image_size: int,
  flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) stored-frame points -> output pixels of `crop_resize(box)` (then mirrored if flip);
  returns (tracks float32 [Q, T, 2], occluded bool [Q, T]), points outside the output occluded."""
  left, top, right, bottom = box
  scale = np.array([image_size / (right - left), image_size / (bottom - top)], np.float64)
  out_QT2 = (np.asarray(tracks_QT2, np.float64) - (left, top)) * scale
  if flip:
    out_QT2[..., 0] = image_size - out_QT2[..., 0]
  # Closed interval: a point on the border stays visible, and flipping keeps it so.
  inside_QT = np.all((out_QT2 >= 0) & (out_QT2 <= image_size), axis=-1)  # NaN -> outside
  return out_QT2.astype(np.float32), np.asarray(occluded_QT, bool) | ~inside_QT


# RandAugment (Cubuk et al. 2020) for video: the same ops with the same parameters on every
# frame of a clip, so augmentation never creates fake motion. magnitude in [0, 10].
RANDAUGMENT_OPS = (
  "identity autocontrast equalize rotate solarize posterize color contrast brightness sharpness "
  "shear_x shear_y translate_x translate_y"
).split()
_GREY = (128, 128, 128)


def _affine(matrix: tuple) -> Callable[[Image.Image], Image.Image]:
  return lambda im: im.transform(
    im.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=_GREY
  )


def _make_op(name: str, rng: np.random.Generator, magnitude: float, size: int):
  """Draws the op's random parameters once; returns the per-frame function."""
  m = magnitude / 10.0
  sign = 1.0 if rng.random() < 0.5 else -1.0
  enhance = {
    "color": ImageEnhance.Color,
    "contrast": ImageEnhance.Contrast,
    "brightness": ImageEnhance.Brightness,
    "sharpness": ImageEnhance.Sharpness,
  }
  if name == "identity":
    return lambda im: im
  if name == "autocontrast":
    return ImageOps.autocontrast
  if name == "equalize":
    return ImageOps.equalize
  if name == "rotate":
    return lambda im: im.rotate(sign * 30 * m, Image.Resampling.BILINEAR, fillcolor=_GREY)
  if name == "solarize":
    return lambda im: ImageOps.solarize(im, int(256 - 256 * m))
  if name == "posterize":
    return lambda im: ImageOps.posterize(im, max(1, int(8 - 4 * m)))
  if name in enhance:
    return lambda im: enhance[name](im).enhance(1 + sign * 0.9 * m)
  if name == "shear_x":
    return _affine((1, sign * 0.3 * m, 0, 0, 1, 0))
  if name == "shear_y":
    return _affine((1, 0, 0, sign * 0.3 * m, 1, 0))
  if name == "translate_x":
    return _affine((1, 0, sign * 0.45 * m * size, 0, 1, 0))
  if name == "translate_y":
    return _affine((1, 0, 0, 0, 1, sign * 0.45 * m * size))
  raise ValueError(f"Unknown RandAugment op {name!r}; known: {RANDAUGMENT_OPS}")


def randaugment(
  clip_THW3: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0
) -> np.ndarray:
  """Applies num_ops random RandAugment ops, identically to every frame of the clip."""
  names = [RANDAUGMENT_OPS[i] for i in rng.integers(0, len(RANDAUGMENT_OPS), size=num_ops)]
  ops = [_make_op(name, rng, magnitude, clip_THW3.shape[2]) for name in names]
  out = np.empty_like(clip_THW3)
  for t, frame in enumerate(clip_THW3):
    img = Image.fromarray(frame)
    for op in ops:
      img = op(img)
    out[t] = np.asarray(img)
  return out


def normalize(
  clips_uint8: np.ndarray,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  flip: Sequence[bool] | None = None,
) -> np.ndarray:
  """uint8 [B, ..., H, W, 3] -> float32 in [0, 1] (the official model's input).

  Then optionally (x - mean) / std. flip[b] mirrors row b horizontally, fused into the
  conversion so the flip costs no extra pass over the pixels.
  """
  out = np.empty(clips_uint8.shape, np.float32)
  for b, clip in enumerate(clips_uint8):
    src = clip[..., ::-1, :] if flip is not None and flip[b] else clip
    np.multiply(src, np.float32(1 / 255), out=out[b], dtype=np.float32)
  if mean is not None:
    out -= np.asarray(mean, np.float32)
  if std is not None:
    out /= np.asarray(std, np.float32)
  return out
