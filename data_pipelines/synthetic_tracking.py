"""Synthetic point-tracking data: textured objects and an occluding bar over a panning background.

  python -m data_pipelines.synthetic --kind tracking --out DIR --split NAME --num-videos N \
      [--frames 16] [--size 32] [--param num_points=32] [--param num_objects=3]

Each video (uint8 [T, S, S, 3]; unlabelled: label -1, empty classes.txt) is rendered back to
front from exact geometry, and its records carry (records.encode(..., tracks, occluded)) the
tracks float32 [Q, T, 2] as (x, y) in the stored frames' pixels (pixel (i, j) covers
[j, j + 1) x [i, i + 1), records.py's convention) and occluded bool [Q, T] of Q = num_points
points:

  background  a random texture (`synthetic.random_texture`) seen through a camera that is still
              (half the videos) or pans at up to S / (2T) pixels per frame in any direction;
  objects     num_objects shapes (ellipse, rectangle, diamond or triangle, radius S/8..S/4,
              random rotation) each with its own periodic texture, translating at up to S / T
              pixels per frame in any direction; they may leave the frame; object k is in front
              of objects < k;
  occluder    a flat-coloured bar (vertical or horizontal, S/8..S/5 wide) in front of everything,
              moving across at 0.5..1.5 S / T pixels per frame, through the middle half of the
              frame in the middle half of the video; it is not tracked.

A point is a fixed spot of the background or of one object (about half the points each when there
are objects), chosen visible at a random query frame: its track is where that spot is in every
frame, and occluded[q, t] is True exactly when the spot is outside the frame or a layer in front
of it (an object in front, or the bar) contains it, evaluated on the same continuous geometry the
renderer evaluates at pixel centres. Objects and the bar have hard edges, so a visible point's
pixel shows its own surface except within half a pixel of an edge; every surface translates
without rotation or scaling, so a point's colour is constant along its track (the texture value
at that spot, up to bilinear sampling and JPEG).

Every video is a pure function of (seed, split, index) and the parameters.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import synthetic

DEFAULT_FRAMES = 16
DEFAULT_SIZE = 32
DEFAULT_PARAMS = {"num_points": 32, "num_objects": 3}
_CANDIDATES = 64  # query positions tried at once when choosing a visible point


def check_params(frames: int, size: int, *, num_points: int, num_objects: int):
  """Raises ValueError naming the problem when the parameters cannot make sensible videos."""
  if num_points < 1 or num_objects < 0:
    raise ValueError(f"Need num_points >= 1 and num_objects >= 0; got {num_points}, {num_objects}.")


class _Scene:
  """The geometry of one video: background camera path, objects and the occluding bar."""

  def __init__(self, rng: np.random.Generator, frames: int, size: int, num_objects: int):
    self.frames, self.size = frames, size
    t = np.arange(frames)
    # Background: a texture just large enough for the camera's path (top-left corner per frame).
    speed = rng.uniform(0, size / (2 * frames)) if rng.random() < 0.5 else 0.0
    angle = rng.uniform(0, 2 * np.pi)
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    height = int(np.ceil(size + abs(vy) * (frames - 1))) + 2
    width = int(np.ceil(size + abs(vx) * (frames - 1))) + 2
    self.background = synthetic.random_texture(rng, height, width, scale=size)
    self.camera_top = (0 if vy >= 0 else height - size - 1) + vy * t
    self.camera_left = (0 if vx >= 0 else width - size - 1) + vx * t

    self.objects = []
    for _ in range(num_objects):
      a = rng.uniform(size / 8, size / 4)
      reach = int(np.ceil(np.hypot(a, a))) + 1  # half the bounding box, any rotation
      speed = rng.uniform(0, size / frames)
      angle = rng.uniform(0, 2 * np.pi)
      start = rng.uniform(0, size, size=2)
      self.objects.append(
        dict(
          shape=synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))],
          a=a,
          b=a * rng.uniform(0.6, 1.0),
          theta=rng.uniform(0, 2 * np.pi),
          reach=reach,
          texture=synthetic.random_texture(rng, 2 * reach, 2 * reach, 2 * a, shapes_per_area=0.5),
          texture_offset=rng.uniform(0, 2 * reach, size=2),
          cy=start[0] + speed * np.sin(angle) * t,
          cx=start[1] + speed * np.cos(angle) * t,
        )
      )

    width = rng.uniform(size / 8, size / 5)
    speed = rng.uniform(0.5, 1.5) * size / frames * rng.choice([-1, 1])
    centre = rng.uniform(size / 4, 3 * size / 4) + speed * (
      t - rng.uniform(frames / 4, 3 * frames / 4)
    )
    self.bar = dict(vertical=bool(rng.random() < 0.5), half_width=width / 2, centre=centre)
    self.bar_colour = rng.integers(0, 256, size=3).astype(np.float32)

  @property
  def num_layers(self) -> int:
    """Background, objects, bar."""
    return len(self.objects) + 2

  def covers(self, layer: int, t: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether layer (1..K objects, K+1 the bar) contains the points (x, y) at frames t."""
    if layer == len(self.objects) + 1:
      along = x if self.bar["vertical"] else y
      return np.abs(along - self.bar["centre"][t]) < self.bar["half_width"]
    o = self.objects[layer - 1]
    dx, dy = x - o["cx"][t], y - o["cy"][t]
    u = np.cos(o["theta"]) * dx + np.sin(o["theta"]) * dy
    v = -np.sin(o["theta"]) * dx + np.cos(o["theta"]) * dy
    return synthetic.shape_distance(o["shape"], u, v, o["a"], o["b"]) < 0

  def render(self) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [T, S, S, 3], layers uint8 [T, S, S]: the layer seen at each pixel centre)."""
    size, frames = self.size, self.frames
    centres = np.arange(size) + 0.5
    t = np.arange(frames)[:, None, None]
    x, y = centres[None, None, :], centres[None, :, None]
    video = np.stack(
      [
        synthetic.window(self.background, self.camera_top[i], self.camera_left[i], size, size)
        for i in range(frames)
      ]
    )
    layers = np.zeros((frames, size, size), np.uint8)
    for k, o in enumerate(self.objects, start=1):
      inside = self.covers(k, t, x, y)
      # The object's periodic texture, tiled to cover the frame, moves with the object.
      tiles = -(-(size + 1) // o["texture"].shape[0]) + 1
      tiled = np.tile(o["texture"], (tiles, tiles, 1))
      period = o["texture"].shape[0]
      for i in range(frames):
        top = (o["texture_offset"][0] - o["cy"][i]) % period
        left = (o["texture_offset"][1] - o["cx"][i]) % period
        surface = synthetic.window(tiled, top, left, size, size)
        video[i] = np.where(inside[i][..., None], surface, video[i])
      layers[inside] = k
    inside = self.covers(self.num_layers - 1, t, x, y)
    inside = np.broadcast_to(inside, (frames, size, size))
    video[inside] = self.bar_colour
    layers[inside] = self.num_layers - 1
    return np.clip(np.rint(video), 0, 255).astype(np.uint8), layers

  def colour(self, layer: int, spot: np.ndarray) -> np.ndarray:
    """Texture colours float32 [N, 3] of surface spots [N, 2] (y, x) of a layer (0 or object)."""
    if layer == 0:
      return synthetic.sample_periodic(self.background, spot[:, 0], spot[:, 1])
    o = self.objects[layer - 1]
    return synthetic.sample_periodic(
      o["texture"], spot[:, 0] + o["texture_offset"][0], spot[:, 1] + o["texture_offset"][1]
    )

  def position(self, layer: int, spot: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in frames t of surface spots [..., 2] (y, x) of a layer (broadcast with t).

    A background spot is in texture coordinates; an object spot is its offset from the centre.
    """
    if layer == 0:
      return spot[..., 1] - self.camera_left[t], spot[..., 0] - self.camera_top[t]
    o = self.objects[layer - 1]
    return spot[..., 1] + o["cx"][t], spot[..., 0] + o["cy"][t]

  def hidden(self, layer: int, t: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether spots of `layer` at (x, y) in frames t are outside the frame or behind a layer."""
    out = (x < 0) | (x >= self.size) | (y < 0) | (y >= self.size)
    for front in range(layer + 1, self.num_layers):
      out = out | self.covers(front, t, x, y)
    return out


def _choose_points(
  rng: np.random.Generator, scene: _Scene, num_points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(layers int [Q], surface spots float64 [Q, 2] (y, x), query frames int [Q]) of points each
  visible at its query frame; half on objects (when there are any), half on the background."""
  size, frames, num_objects = scene.size, scene.frames, len(scene.objects)
  layers = np.zeros(num_points, np.int64)
  spots = np.zeros((num_points, 2))
  queries = np.zeros(num_points, np.int64)
  todo = np.arange(num_points)
  for _ in range(100):
    n = len(todo)
    on_object = rng.random(n) < (0.5 if num_objects else 0.0)
    layer = np.where(on_object, rng.integers(num_objects or 1, size=n) + 1, 0)
    query = rng.integers(frames, size=n)
    found = np.zeros(n, bool)
    for layer_id in np.unique(layer):
      rows = np.flatnonzero(layer == layer_id)
      t = query[rows, None]  # [m, 1] against [m, candidates]
      if layer_id == 0:
        spot = rng.uniform(0, size, size=(len(rows), _CANDIDATES, 2))
        spot += np.stack([scene.camera_top[t], scene.camera_left[t]], -1)
      else:
        reach = scene.objects[layer_id - 1]["reach"]
        spot = rng.uniform(-reach, reach, size=(len(rows), _CANDIDATES, 2))
      x, y = scene.position(layer_id, spot, t)
      visible = ~scene.hidden(layer_id, t, x, y)
      if layer_id:  # on the object itself, not just in its bounding box
        visible &= scene.covers(layer_id, t, x, y)
      first = visible.argmax(1)
      found[rows] = visible.any(1)
      layers[todo[rows]] = layer_id
      spots[todo[rows]] = spot[np.arange(len(rows)), first]
      queries[todo[rows]] = query[rows]
    todo = todo[~found]
    if not len(todo):
      return layers, spots, queries
  raise RuntimeError("No visible point found in 100 tries; the scene is fully covered.")


def make_video(
  rng: np.random.Generator, frames: int, size: int, *, num_points: int, num_objects: int
) -> dict[str, np.ndarray]:
  """One video and its point tracks.

  Returns dict(frames=uint8 [T, S, S, 3], tracks=float32 [Q, T, 2] (x, y), occluded=bool
  [Q, T], and for checks: layers=uint8 [T, S, S] (the layer at each pixel centre: 0 background,
  1..K objects, K + 1 the bar), point_layers=int [Q], point_colours=float32 [Q, 3] (texture
  value at each point), query_frames=int [Q]).
  """
  scene = _Scene(rng, frames, size, num_objects)
  video, layer_map = scene.render()
  layers, spots, queries = _choose_points(rng, scene, num_points)
  tracks = np.empty((num_points, frames, 2), np.float32)
  occluded = np.empty((num_points, frames), bool)
  colours = np.empty((num_points, 3), np.float32)
  t = np.arange(frames)[None]
  for layer_id in np.unique(layers):
    rows = layers == layer_id
    x, y = scene.position(layer_id, spots[rows][:, None], t)
    tracks[rows] = np.stack([x, y], -1)
    occluded[rows] = scene.hidden(layer_id, t, x, y)
    colours[rows] = scene.colour(layer_id, spots[rows])
  return dict(
    frames=video,
    tracks=tracks,
    occluded=occluded,
    layers=layer_map,
    point_layers=layers,
    point_colours=colours,
    query_frames=queries,
  )
