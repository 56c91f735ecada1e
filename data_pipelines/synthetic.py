"""Embedded synthetic datasets, generated into a directory in the record format of records.py.

  python -m data_pipelines.synthetic --out DIR --split NAME --num-videos N [--kind motion] \
      [--variant dark] [--frames T] [--size S] [--seed 0] [--num-shards 4] [--param NAME=VALUE]

writes DIR/{split}.array_record-*, DIR/classes.txt and DIR/{split}.summary.json (frames uint8
[T, S, S, 3], JPEG), so the real pipeline reads it. Three kinds:

  motion        (this module; classes left, right, up, down) the class is defined only by motion
                over time. Variants:
                dark       (default) one bright square or disc on a dark (0..16) smooth background.
                realistic  textured backgrounds of any brightness, varied objects, sensor noise,
                           small distractors and H.264 compression (below).
  memorisation  (synthetic_memorisation.py; unlabelled) a camera panning over large textures,
                with scene cuts, so that recent frames differ from older ones.
  tracking      (synthetic_tracking.py; unlabelled) textured objects and an occluding bar over a
                panning background, with exact point tracks and occlusion in the records.

Motion, dark: one bright square or disc of random colour and size moves by a random 1/16..1/10 of
the frame per frame in its class direction, wrapping around the borders (a torus). Its start
position is uniform over the frame, so the position in every single frame is uniform and
independent of the class, as are the colours, shape, size and the random smooth background; a
model seeing one frame is at chance (tested), two frames suffice.

Motion, realistic: the background is a random mean brightness (0..255, any) with a per-channel
tint, an uneven illumination field, 1/f^e luminance texture (e in 0.6..2: from fine grain to
smooth blobs; contrast up to 45) and coloured 1/f^e noise; every frame adds fresh Gaussian sensor
noise (sd 1..8). The class object is an ellipse, rectangle, diamond or triangle (random aspect and
rotation, anti-aliased edges, a plaid texture of its own) of radius S/10..S/5 and any colour at
least 100 RGB units and 30 luma levels from the background's mean, so it may be darker than the
background; it moves at S/20..S/10 pixels per frame in its class direction, with a perpendicular
drift of up to 0.2 of that speed, wrapping around the borders. `distractors` (default 2) specks
(discs of radius S/32..S/16, below the class object's smallest) of any colour move in uniformly
random directions at 0..S/10 pixels per frame, in front of or behind it: the class is the motion
of the largest object (a nearest-centroid classifier on correlations of frame differences gets
0.96, tested > 0.85). Every single frame stays at chance (tested on pixels and on the
translation-invariant power spectrum, which would expose direction-dependent compression
artefacts). The video is then H.264-encoded (libx264, 4:2:0, `crf` default 23 as x264's, preset
veryfast, tune zerolatency, one thread so the bytes do not depend on the machine) and decoded
back, as real footage is, before JPEG storage; crf=0 skips that step. Frames change by 8 grey
levels on average at crf 23 (6 at 18, 10 at 28; much of it is the 4:2:0 chroma and the sensor
noise going). Measured on a shared 2-core VM (one core used): 2048 + 256 videos of 16 frames at
32x32 in 19-22 s, about half of it the H.264 round trips (crf=0: 10 s; dark: 3 s).

Horizontal flip swaps left and right, so train motion data with flip=False. Labels cycle through
the classes (balanced splits). Every video is a pure function of (seed, split, index) and the
parameters, so splits generated with different seeds (or split names) are disjoint and
regeneration is byte-identical on one machine (across CPUs a pixel may differ by a level, see
`signature`). The summary records kind, variant, parameters and video 0's fingerprint (sha256)
and signature, and `ensure` refuses a directory generated differently.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import av
import numpy as np
from etils import epath

from data_pipelines import labels as labels_lib
from data_pipelines import records, shards

CLASSES = ("left", "right", "up", "down")
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
KINDS = ("motion", "memorisation", "tracking")
VARIANTS = ("dark", "realistic")
DEFAULT_VARIANT = "dark"
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 32
FPS = 10.0
# Parameters of each motion variant, with their defaults (recorded in the summary).
VARIANT_PARAMS = {"dark": {}, "realistic": {"distractors": 2, "crf": 23}}
_LUMA = np.array([0.299, 0.587, 0.114])  # RGB -> luma weights (BT.601)
SHAPES = ("ellipse", "rectangle", "diamond", "triangle")  # see shape_distance


# ----------------------------------------------------------------------------- building blocks
# Shared by the three kinds (synthetic_memorisation and synthetic_tracking import them).


def noise_texture(
  rng: np.random.Generator, height: int, width: int, channels: int = 1, exponent: float = 1.0
) -> np.ndarray:
  """Periodic noise float32 [height, width, channels] with amplitude spectrum 1/f^exponent.

  Zero mean and unit standard deviation per channel; exponent 1 is the spectrum of natural
  images, larger is smoother. Periodic, so it can be sampled on a torus.
  """
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  f = np.sqrt(fy**2 + fx**2)
  f[0, 0] = np.inf  # no DC: zero mean
  shape = (2, channels, height, width // 2 + 1)
  parts = rng.standard_normal(shape, np.float32) * (f**-exponent).astype(np.float32)
  field = np.fft.irfft2(parts[0] + 1j * parts[1], s=(height, width)).astype(np.float32)
  field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
  return field.transpose(1, 2, 0)


def shape_distance(kind: str, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
  """Approximate signed distance in pixels (< 0 inside) to a shape centred at the origin.

  u, v: coordinates in the shape's frame; a, b: half extents along u and v. kind is one of
  SHAPES.
  """
  if kind == "ellipse":
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1) * min(a, b)
  if kind == "rectangle":
    return np.maximum(np.abs(u) - a, np.abs(v) - b)
  if kind == "diamond":
    return (np.abs(u) / a + np.abs(v) / b - 1) * (a * b / np.hypot(a, b))
  if kind == "triangle":  # inradius a / 2 (b unused), one vertex along -v
    angles = np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
    return np.max([np.cos(g) * u + np.sin(g) * v for g in angles], axis=0) - a / 2
  raise ValueError(f"Unknown shape {kind!r}; use one of {SHAPES}.")


def sample_periodic(texture_HWC: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Bilinear samples of a periodic texture at pixel coordinates (y, x) (texel centres at +0.5)."""
  height, width = texture_HWC.shape[:2]
  y, x = np.asarray(y) - 0.5, np.asarray(x) - 0.5
  y0, x0 = np.floor(y), np.floor(x)
  fy, fx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(np.int64) % height, x0.astype(np.int64) % width
  y1, x1 = (y0 + 1) % height, (x0 + 1) % width
  return (
    texture_HWC[y0, x0] * (1 - fy) * (1 - fx)
    + texture_HWC[y1, x0] * fy * (1 - fx)
    + texture_HWC[y0, x1] * (1 - fy) * fx
    + texture_HWC[y1, x1] * fy * fx
  )


def window(texture_HWC: np.ndarray, top: float, left: float, height: int, width: int):
  """The [height, width, C] view of a texture from a camera at sub-pixel offset (top, left) >= 0.

  Window pixel (i, j) shows the texture at (top + i + 0.5, left + j + 0.5), bilinearly
  (texel centres at +0.5); the window must lie inside the texture (no wrap-around): slices, not
  gathers, so panning a camera costs a few small array operations per frame.
  """
  iy, ix = int(top), int(left)
  fy, fx = np.float32(top - iy), np.float32(left - ix)
  block = texture_HWC[iy : iy + height + 1, ix : ix + width + 1]
  if block.shape[:2] != (height + 1, width + 1):
    raise ValueError(f"Window at ({top}, {left}) leaves the texture {texture_HWC.shape[:2]}.")
  rows = block[:-1] * (1 - fy) + block[1:] * fy
  return rows[:, :-1] * (1 - fx) + rows[:, 1:] * fx


def random_texture(
  rng: np.random.Generator, height: int, width: int, scale: float, shapes_per_area: float = 2.0
) -> np.ndarray:
  """A periodic scene texture float32 [height, width, 3] in about 0..255.

  Multi-scale coloured 1/f noise (random exponent, brightness, luminance and colour contrast,
  tint) under random hard-edged shapes of random colours, log-uniform radii scale/16..scale/2,
  `shapes_per_area` per scale x scale area: shifted copies differ at every scale.
  """
  noise = noise_texture(rng, height, width, 3, rng.uniform(0.7, 1.6))
  luminance = noise.mean(-1, keepdims=True)
  texture = (
    rng.uniform(40, 215)
    + rng.normal(0, 20, size=3).astype(np.float32)
    + np.float32(rng.uniform(15, 50) * np.sqrt(3)) * luminance  # unit std, then the contrast
    + np.float32(rng.uniform(5, 30)) * (noise - luminance)
  )
  for _ in range(max(1, round(shapes_per_area * height * width / scale**2))):
    kind = SHAPES[rng.integers(len(SHAPES))]
    a = scale * np.exp(rng.uniform(np.log(1 / 16), np.log(1 / 2)))
    b = a * rng.uniform(0.4, 1.0)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    theta = rng.uniform(0, 2 * np.pi)
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    # Only the shape's bounding box, with wrap-around indices, so the texture stays periodic.
    offsets = np.arange(-int(np.hypot(a, b)) - 1, int(np.hypot(a, b)) + 2)
    dy = (int(cy) + offsets + 0.5 - cy)[:, None]
    dx = (int(cx) + offsets + 0.5 - cx)[None, :]
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    inside = shape_distance(kind, u, v, a, b) <= 0
    index = ((int(cy) + offsets) % height)[:, None], ((int(cx) + offsets) % width)[None, :]
    texture[index] = np.where(inside[..., None], colour, texture[index])
  return texture


# BT.601 limited-range RGB -> YCbCr, the matrix H.264 decoders assume for untagged SD video.
_RGB_TO_YUV = (
  np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255
)
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV)


def _mix(matrix: np.ndarray, channels: list[np.ndarray]) -> list[np.ndarray]:
  """matrix @ channels, channel by channel: elementwise float32 (a BLAS matmul on [N, 3] is
  slower here, and its threads fight over a busy machine's cores)."""
  return [sum(np.float32(m) * c for m, c in zip(row, channels, strict=True)) for row in matrix]


def h264_roundtrip(frames_THW3: np.ndarray, crf: int) -> np.ndarray:
  """uint8 frames [T, H, W, 3] (H, W even) after an H.264 (libx264, 4:2:0) encode and decode.

  The colour conversions are done here in numpy, for all frames at once: twice as fast as
  letting libswscale convert frame by frame, and the same on every machine.
  """
  num_frames, height, width, _ = frames_THW3.shape
  rgb = frames_THW3.astype(np.float32)
  y, u, v = _mix(_RGB_TO_YUV, [rgb[..., 0], rgb[..., 1], rgb[..., 2]])
  # 4:2:0: chroma averaged over 2x2 pixels. PyAV's yuv420p layout is the Y plane, then the U
  # and V planes, each flattened, as one [3H/2, W] array per frame.
  quarter = lambda c: (c[:, ::2, ::2] + c[:, 1::2, ::2] + c[:, ::2, 1::2] + c[:, 1::2, 1::2]) / 4
  planes = np.concatenate(
    [(y + 16).reshape(num_frames, -1)]
    + [(quarter(c) + 128).reshape(num_frames, -1) for c in (u, v)],
    axis=1,
  )
  planes = np.clip(np.rint(planes), 0, 255).astype(np.uint8).reshape(num_frames, -1, width)
  buffer = io.BytesIO()
  with av.open(buffer, "w", format="h264") as container:
    stream = container.add_stream("libx264", rate=int(FPS))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    # One thread: x264's output depends on its thread count, which would follow the machine.
    # zerolatency (no B-frames, no lookahead), as cameras and live streams encode: a third
    # faster than the default lookahead on 16-frame clips.
    options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency", "threads": "1"}
    stream.options = options
    for plane in planes:
      for packet in stream.encode(av.VideoFrame.from_ndarray(plane, format="yuv420p")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  buffer.seek(0)
  with av.open(buffer, format="h264") as container:
    container.streams.video[0].thread_count = 1
    decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
  if len(decoded) != num_frames:
    raise RuntimeError(f"H.264 round trip returned {len(decoded)} of {num_frames} frames.")
  flat = np.stack(decoded).reshape(num_frames, -1).astype(np.float32)
  luma, quarter_size = height * width, height * width // 4

  def upsampled(plane):  # nearest-neighbour 2x, as the 4:2:0 planes were averaged 2x2
    return plane.reshape(num_frames, height // 2, width // 2).repeat(2, 1).repeat(2, 2) - 128

  yuv = [
    flat[:, :luma].reshape(num_frames, height, width) - 16,
    upsampled(flat[:, luma : luma + quarter_size]),
    upsampled(flat[:, luma + quarter_size :]),
  ]
  rgb = np.stack(_mix(_YUV_TO_RGB, yuv), axis=-1)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- motion kind


def make_video(
  rng: np.random.Generator,
  label: int,
  frames: int,
  size: int,
  variant: str = DEFAULT_VARIANT,
  **params: Any,
) -> np.ndarray:
  """One motion video uint8 [frames, size, size, 3] whose direction is CLASSES[label]."""
  if variant == "dark":
    return _dark_video(rng, label, frames, size)
  if variant == "realistic":
    return _realistic_video(rng, label, frames, size, **params)
  raise ValueError(f"Unknown motion variant {variant!r}; use one of {VARIANTS}.")


def _dark_video(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
  # Smooth random background: a 4x4 random field upsampled, dark so the shape stands out. Kept
  # dark on purpose: the RG-LRU's first step is un-normalised (m_0 = 1), so a bright background
  # in frame 0 dominates slow recurrent channels; with a 0..110 background the tiny model needs
  # far more than the 300 steps synthetic_tiny budgets (measured: chance after 400 steps).
  # Byte-identical to the generator the recorded synthetic_tiny results used (pinned by a test).
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


def _bilinear_field(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
  """A smooth illumination field float64 [size, size, 3]: a random 3x3 grid upsampled."""
  coarse = rng.uniform(-amplitude, amplitude, size=(3, 3, 3))
  ramp = np.linspace(0, 2, size)
  i0 = np.floor(ramp).astype(int).clip(0, 1)
  f = ramp - i0
  rows = coarse[i0] * (1 - f)[:, None, None] + coarse[i0 + 1] * f[:, None, None]  # [S, 3, 3]
  return rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]


def _realistic_video(
  rng: np.random.Generator, label: int, frames: int, size: int, *, distractors: int, crf: int
) -> np.ndarray:
  # Background: any brightness, texture from fine grain to smooth blobs, uneven illumination.
  mean = rng.uniform(0, 255)
  background = (
    mean
    + rng.normal(0, 20, size=3)
    + _bilinear_field(rng, size, rng.uniform(0, 50))
    + rng.uniform(5, 45) * noise_texture(rng, size, size, 1, rng.uniform(0.6, 2.0))
    + rng.uniform(0, 20) * noise_texture(rng, size, size, 3, rng.uniform(1.0, 2.0))
  )
  # The class object: any colour, but visibly different from the background on average.
  while True:
    colour = rng.uniform(0, 255, size=3)
    difference = colour - background.mean((0, 1))
    if np.linalg.norm(difference) >= 100 and abs(difference @ _LUMA) >= 30:
      break
  speed = rng.uniform(size / 20, size / 10)
  dy, dx = _DIRECTIONS[CLASSES[label]]
  drift = rng.uniform(-0.2, 0.2) * speed  # perpendicular to the class direction
  velocity = (dy * speed + dx * drift, dx * speed + dy * drift)
  radius = rng.uniform(size / 10, size / 5)
  objects = [
    dict(
      shape=SHAPES[rng.integers(len(SHAPES))],
      a=radius,
      b=radius * rng.uniform(0.6, 1.0),
      theta=rng.uniform(0, 2 * np.pi),
      colour=colour,
      plaid=_plaid(rng, contrast=rng.uniform(0, 30)),
      start=rng.uniform(0, size, size=2),
      velocity=velocity,
    )
  ]
  # Distractors: at most half the class object's smallest radius, any direction and colour.
  for _ in range(distractors):
    r = rng.uniform(size / 32, size / 16)
    angle = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(0, size / 10)
    objects.append(
      dict(
        shape="ellipse",
        a=r,
        b=r,
        theta=0.0,
        colour=rng.uniform(0, 255, size=3),
        plaid=None,
        start=rng.uniform(0, size, size=2),
        velocity=(v * np.sin(angle), v * np.cos(angle)),
      )
    )
  order = rng.permutation(len(objects))  # depth order: later is in front
  noise_sd = rng.uniform(1, 8)

  grid = np.arange(size, dtype=np.float32) + 0.5
  t = np.arange(frames, dtype=np.float32)[:, None]
  video = np.broadcast_to(background.astype(np.float32), (frames, size, size, 3)).copy()
  for k in order:
    o = objects[k]
    cy = o["start"][0] + o["velocity"][0] * t  # [T, 1]
    cx = o["start"][1] + o["velocity"][1] * t
    # Offsets on the torus [T, S, 1] and [T, 1, S]: objects wrap instead of leaving the frame.
    ddy = ((grid[None, :] - cy + size / 2) % size - size / 2)[:, :, None]
    ddx = ((grid[None, :] - cx + size / 2) % size - size / 2)[:, None, :]
    u = np.cos(o["theta"]) * ddx + np.sin(o["theta"]) * ddy
    v = -np.sin(o["theta"]) * ddx + np.cos(o["theta"]) * ddy
    # Anti-aliased edge: coverage falls from 1 to 0 over one pixel across the boundary.
    alpha = np.clip(0.5 - shape_distance(o["shape"], u, v, o["a"], o["b"]), 0, 1)[..., None]
    colour = o["colour"].astype(np.float32)
    if o["plaid"] is not None:
      colour = colour + o["plaid"](u, v)[..., None]
    video += alpha * (colour - video)
  video += noise_sd * rng.standard_normal(video.shape, np.float32)  # sensor noise, every frame
  video = np.clip(np.rint(video), 0, 255).astype(np.uint8)
  return h264_roundtrip(video, crf) if crf else video


def _plaid(rng: np.random.Generator, contrast: float):
  """A texture that moves with its object: two random gratings, f(u, v) -> same shape."""
  freqs = rng.uniform(0.15, 0.6, size=2)
  angles = rng.uniform(0, np.pi, size=2)
  phases = rng.uniform(0, 2 * np.pi, size=2)

  def texture(u, v):
    return contrast * sum(
      np.cos(2 * np.pi * f * (np.cos(g) * u + np.sin(g) * v) + p) / 2
      for f, g, p in zip(freqs, angles, phases, strict=True)
    )

  return texture


# ----------------------------------------------------------------------------- kinds and specs


def _kind_module(kind: str):
  """The module of a non-motion kind (imported here: those modules import this one).

  Such a module defines DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_PARAMS (name -> int),
  check_params(frames, size, **params) and make_video(rng, frames, size, **params) -> dict(
  frames=uint8 [T, S, S, 3], optionally tracks and occluded for records.encode, and extras).
  """
  return importlib.import_module(f"data_pipelines.synthetic_{kind}")


def resolve_spec(
  kind: str = "motion",
  variant: str | None = None,
  frames: int | None = None,
  size: int | None = None,
  seed: int = 0,
  params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The full parameters of a split (defaults filled in, validated), as the summary records them.

  variant applies to kind "motion" only (None or "" picks DEFAULT_VARIANT); params are the
  kind's (or the motion variant's) own parameters, e.g. distractors, crf, num_points.
  """
  params = dict(params or {})
  if kind not in KINDS:
    raise ValueError(f"Unknown synthetic kind {kind!r}; use one of {KINDS}.")
  if kind == "motion":
    variant = variant or DEFAULT_VARIANT
    if variant not in VARIANTS:
      raise ValueError(f"Unknown motion variant {variant!r}; use one of {VARIANTS}.")
    defaults, default_frames, default_size = VARIANT_PARAMS[variant], DEFAULT_FRAMES, DEFAULT_SIZE
    where = f"kind 'motion', variant {variant!r}"
  else:
    if variant:
      raise ValueError(
        f"variant {variant!r} applies to kind 'motion' only; leave it empty for kind {kind!r}."
      )
    module = _kind_module(kind)
    defaults, default_frames, default_size = (
      module.DEFAULT_PARAMS,
      module.DEFAULT_FRAMES,
      module.DEFAULT_SIZE,
    )
    where = f"kind {kind!r}"
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise ValueError(
      f"Unknown parameter(s) {unknown} for {where}; "
      f"its parameters are {sorted(defaults) or 'none'}."
    )
  for name, value in params.items():
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"Parameter {name} of {where} must be an integer, got {value!r}.")
  frames = default_frames if frames is None else int(frames)
  size = default_size if size is None else int(size)
  if frames < 2 or size < 8:
    raise ValueError(f"Need frames >= 2 and size >= 8; got frames={frames}, size={size}.")
  spec = dict(kind=kind, frames=frames, size=size, seed=int(seed), params={**defaults, **params})
  if kind == "motion":
    spec["variant"] = variant
    if variant == "realistic":
      crf = spec["params"]["crf"]
      if crf and size % 2:
        raise ValueError(f"H.264 (crf={crf}) needs an even size, got {size}; or set crf=0.")
      if not 0 <= crf <= 51 or spec["params"]["distractors"] < 0:
        raise ValueError(f"Need 0 <= crf <= 51 and distractors >= 0; got {spec['params']}.")
  else:
    module.check_params(frames, size, **spec["params"])
  return spec


def classes_of(kind: str) -> tuple[str, ...]:
  """Class names of a kind (empty for the unlabelled kinds)."""
  return CLASSES if kind == "motion" else ()


def make_example(spec: Mapping[str, Any], split: str, index: int) -> dict[str, Any]:
  """Video `index` of a split: dict(frames=uint8 [T, S, S, 3], label, [tracks, occluded])."""
  rng = _rng(spec["seed"], split, index)
  frames, size, params = spec["frames"], spec["size"], spec["params"]
  if spec["kind"] == "motion":
    label = index % len(CLASSES)
    return dict(
      frames=make_video(rng, label, frames, size, spec["variant"], **params),
      label=label,
      label_name=CLASSES[label],
    )
  # The other kinds' make_video returns dict(frames, [tracks, occluded], and extras for checks).
  example = _kind_module(spec["kind"]).make_video(rng, frames, size, **params)
  return dict(example, label=-1, label_name="")


def fingerprint(example: Mapping[str, Any]) -> str:
  """sha256 of an example's raw frames (and tracks, occlusion): changes with the generator."""
  digest = hashlib.sha256()
  for key in ("frames", "tracks", "occluded"):
    if example.get(key) is not None:
      digest.update(np.ascontiguousarray(example[key]).tobytes())
  return digest.hexdigest()


def signature(example: Mapping[str, Any]) -> list[float]:
  """A coarse summary of an example: per-frame channel means (grey levels), and for tracks their
  mean (pixels) and occluded percentage.

  numpy dispatches transcendental functions (sin, exp) to CPU-specific SIMD code whose last bit
  can differ between machines, which may move a pixel by one level: the fingerprint then
  differs while this summary stays within _SIGNATURE_TOLERANCE. A real change of the generator
  (other random draws, shapes, speeds) moves it by far more.
  """
  frames = example["frames"]
  values = frames.reshape(len(frames), -1, 3).mean(1).ravel().tolist()
  if example.get("tracks") is not None:
    values += [float(example["tracks"].mean()), 100 * float(example["occluded"].mean())]
  return [round(v, 3) for v in values]


_SIGNATURE_TOLERANCE = 0.25


def _same_generator(recorded: Mapping[str, Any], example: Mapping[str, Any]) -> bool:
  """Whether a summary's fingerprint (and signature) match what the generator makes now."""
  if recorded.get("fingerprint") in (None, fingerprint(example)):
    return True  # None: summaries from before fingerprints
  before, now = recorded.get("signature"), signature(example)
  return (
    before is not None
    and len(before) == len(now)
    and np.allclose(before, now, rtol=0, atol=_SIGNATURE_TOLERANCE)
  )


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _encode(example: Mapping[str, Any], video_id: str) -> bytes:
  kwargs = {}
  if example.get("tracks") is not None:
    kwargs = dict(tracks=example["tracks"], occluded=example["occluded"])
  return records.encode(
    example["frames"],
    video_id=video_id,
    fps=FPS,
    label=example["label"],
    label_name=example["label_name"],
    **kwargs,
  )


# ----------------------------------------------------------------------------- writing


def generate(
  out_dir: str,
  split: str,
  num_videos: int,
  frames: int | None = None,
  size: int | None = None,
  seed: int = 0,
  *,
  kind: str = "motion",
  variant: str | None = None,
  num_shards: int = 4,
  **params: Any,
) -> dict:
  """Writes the split to out_dir (shards, classes.txt, summary); returns the summary.

  frames and size default to the kind's defaults; params are the kind's own (see resolve_spec).
  """
  spec = resolve_spec(kind, variant, frames, size, seed, params)
  if num_videos < 1:
    raise ValueError(f"Need num_videos >= 1, got {num_videos}.")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  classes = classes_of(kind)
  classes_path = out / labels_lib.CLASSES_FILE
  if classes_path.exists():
    if tuple(labels_lib.read_classes_file(classes_path)) != classes:
      raise ValueError(
        f"{classes_path} exists with other classes than kind {kind!r} has ({list(classes)}); "
        "use another --out directory."
      )
  else:
    shards.write_text_atomic(classes_path, "".join(f"{c}\n" for c in classes))
  num_shards = max(1, min(num_shards, num_videos))
  for stale in shards.existing_shard_counts(out, split):
    if stale != num_shards:
      raise ValueError(f"{out} holds a {stale}-shard copy of split {split!r}; delete it first.")

  per_shard = []
  identity = {}
  for s in range(num_shards):
    with shards.AtomicShardWriter(out / shards.shard_name(split, s, num_shards)) as writer:
      for i in range(s * num_videos // num_shards, (s + 1) * num_videos // num_shards):
        example = make_example(spec, split, i)
        if i == 0:
          identity = dict(fingerprint=fingerprint(example), signature=signature(example))
        writer.write(_encode(example, f"{split}-{i:07d}"))
    per_shard.append(writer.num_records)
  summary = dict(
    split=split,
    schema_version=records.SCHEMA_VERSION,
    num_shards=num_shards,
    converted=num_videos,
    skipped=[],
    num_skipped=0,
    records_per_shard=per_shard,
    num_classes=len(classes),
    synthetic=dict(spec, **identity),
  )
  shards.write_text_atomic(out / f"{split}.summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def _recorded_spec(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The spec a summary records; summaries from before kinds existed were motion, dark."""
  recorded = dict(summary.get("synthetic") or {})
  recorded.pop("fingerprint", None)
  recorded.pop("signature", None)
  if recorded and "kind" not in recorded:
    recorded.update(kind="motion", variant="dark", params={})
  return recorded


def ensure(
  out_dir: str,
  *,
  kind: str = "motion",
  variant: str | None = None,
  num_train: int = 2048,
  num_validation: int = 512,
  frames: int | None = None,
  size: int | None = None,
  seed: int = 0,
  **params: Any,
) -> None:
  """Generates the `train` and `validation` splits into out_dir unless already complete.

  A complete split is reused only if its summary records the same kind, variant, parameters
  and video count, and the generator still makes the same video 0; otherwise this raises
  before generating anything. Safe to call from every process of a multi-process job on a
  shared directory: the bytes are a function of the arguments and every file appears by an
  atomic rename.
  """
  out = epath.Path(out_dir)
  todo = []
  for split, n, split_seed in (
    ("train", num_train, seed),
    ("validation", num_validation, seed + 1),
  ):
    spec = resolve_spec(kind, variant, frames, size, split_seed, params)
    # The summary is written last, so its presence marks a complete split.
    path = out / f"{split}.summary.json"
    if not path.exists():
      todo.append((split, n, spec))
      continue
    summary = json.loads(path.read_text())
    recorded = _recorded_spec(summary)
    problem = None
    if recorded != spec or summary.get("converted") != n:
      problem = (
        f"it holds {summary.get('converted')} videos of {recorded}, but {n} videos of {spec} "
        "were asked for"
      )
    elif not _same_generator(summary["synthetic"], make_example(spec, split, 0)):
      problem = (
        "its video 0 differs from what the current generator makes with the same parameters "
        "(the generator, or a library it uses such as PyAV's x264, changed)"
      )
    if problem:
      raise ValueError(
        f"{out} already holds a synthetic {split!r} split, but {problem}. Delete {out} to "
        "regenerate it (or use another workdir / --config.data.path)."
      )
  for split, n, spec in todo:
    generate(
      out_dir,
      split,
      n,
      spec["frames"],
      spec["size"],
      spec["seed"],
      kind=spec["kind"],
      variant=spec.get("variant"),
      **spec["params"],
    )


def _parse_param(text: str) -> tuple[str, Any]:
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}.")
  try:
    return name, json.loads(value)
  except json.JSONDecodeError:
    return name, value


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--split", required=True)
  parser.add_argument("--num-videos", type=int, required=True)
  parser.add_argument("--kind", default="motion", choices=KINDS)
  parser.add_argument(
    "--variant", default=None, help=f"motion only: one of {VARIANTS} (default {DEFAULT_VARIANT})"
  )
  parser.add_argument("--frames", type=int, default=None, help="default: the kind's")
  parser.add_argument("--size", type=int, default=None, help="default: the kind's")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-shards", type=int, default=4)
  parser.add_argument(
    "--param",
    type=_parse_param,
    action="append",
    default=[],
    metavar="NAME=VALUE",
    help="a parameter of the kind or variant, e.g. distractors=0, crf=23, num_points=64",
  )
  args = parser.parse_args(argv)
  try:
    generate(
      args.out,
      args.split,
      args.num_videos,
      args.frames,
      args.size,
      args.seed,
      kind=args.kind,
      variant=args.variant,
      num_shards=args.num_shards,
      **dict(args.param),
    )
  except ValueError as e:
    parser.error(str(e))
  print(f"wrote {args.num_videos} videos of split {args.split!r} to {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
