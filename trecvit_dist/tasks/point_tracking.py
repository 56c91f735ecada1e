"""Task `point_tracking`: a frozen encoder's per-frame tokens read by a recurrent point tracker.

PointTrackingModel: video [b, t, h, w, 3] in [0, 1] + query points [b, q, 3] as (t, y, x) in the
clip's pixels -> tracks [b, q, t, 2] as (x, y) in the clip's pixels, occlusion and certainty
logits [b, q, t]. The family's encoder (its own parameter names, e.g. TRecViT's tokenizer/ and
encoder/) gives final-layer tokens per time slot (`tokens()`, laid out as `family.token_grid`
says) under stop_gradient; only readout/ trains (`readout.frozen_encoder_tx`).

The readout follows MooG's recurrent point readout (van Steenkiste et al., 2024), learned from
its description and written here anew:
  - a query point's (x, y), as 2D Fourier features and an MLP, is the state of that point; the
    state is reset to it at the point's query frame (before it, the outputs mean nothing and
    are neither trained nor evaluated);
  - frame by frame, in order: `num_layers` pre-LN blocks of cross-attention from the q states to
    the frame's tokens (LayerNorm, projected to the readout width, plus a Fourier embedding of
    each patch's centre so that attention can read positions) and an MLP correct the state; the
    heads read the corrected state; a residual MLP and a LayerNorm carry it to the next frame;
  - heads: the position as the query's position plus a predicted offset (a zero-initialised
    last layer, so training starts from "the point stays where it was queried"), and two logits,
    occlusion and certainty (the prediction is within CERTAINTY_PX of the truth). A point is
    predicted visible when P(visible) * P(certain) > 0.5 (TAPIR's rule).
The readout's state is [b, q, width] whatever the video length, and the encoder's per-frame
step (TRecViT: `encode(frame, state)`) carries its own, so `PointTrackingModel.step` tracks a
stream one frame at a time in constant memory; `track_frame_by_frame` gives the same numbers as
the full pass (`track`).

Loss (TAPIR-style), on frames from each point's query frame on, positions in 256x256 pixels:
huber_weight * Huber(delta HUBER_DELTA_PX) on the visible points' positions + sigmoid
cross-entropy on occlusion + sigmoid cross-entropy on certainty (target: the stop-gradient
prediction lies within CERTAINTY_PX of a visible point). Each term is averaged over its entries.

Evaluation: TAP-Vid metrics, query mode "first" (trecvit_dist.tapvid's conventions, written in
jax: `tapvid_sums`), per video, summed over the videos where every metric is defined (at least
one visible point after its query frame) with that number as `count`: the trainer's sums / count
is the mean over those videos of compute_tapvid_metrics. Eval batches have one view (the
pipeline's num_points needs eval_clips = eval_crops = 1).
"""

import dataclasses
import functools
import inspect
from typing import Any

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics

from data_pipelines import pipeline
from trecvit_dist import tapvid
from trecvit_dist.models import layers
from trecvit_dist.models.family import TokenGrid
from trecvit_dist.models.layers import LOGICAL
from trecvit_dist.tasks.readout import READOUT, frozen_encoder_tx
from trecvit_dist.tasks.task import Task

RASTER = 256  # TAP-Vid evaluates (and TAPIR trains) positions in 256x256 pixels
HUBER_DELTA_PX = 4.0
CERTAINTY_PX = 8.0

# config.tracking fields and their defaults (a config may leave any out).
DEFAULTS = dict(
  num_points=64,  # query points per training clip
  eval_num_points=64,  # per eval clip: the first ones of each video (cycled when fewer)
  width=512,  # readout state width
  num_layers=3,  # cross-attention blocks per frame
  num_heads=8,
  mlp_dim=2048,
  fourier_bases=16,
  huber_weight=0.05,
  fresh_encoder=False,  # True: a random-init encoder without init_from (the baseline)
  image_videos=2,
  image_points=16,
)


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.tracking over DEFAULTS; unknown fields are an error (a typo would go unnoticed)."""
  given = dict(config.get("tracking", None) or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.tracking has unknown fields {unknown}; known: {sorted(DEFAULTS)}.")
  return {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
  """The readout's size."""

  width: int = 512
  num_layers: int = 3
  num_heads: int = 8
  mlp_dim: int = 2048
  fourier_bases: int = 16


# ----------------------------------------------------------------------------- input checks


def check_shapes(video_shape, query_shape, tracks_shape=None, occluded_shape=None) -> None:
  """ValueError naming the mismatch between a video [b, t, h, w, 3], query points [b, q, 3]
  and (optionally) tracks [b, q, t, 2] and occlusion [b, q, t]."""
  video_shape, query_shape = tuple(video_shape), tuple(query_shape)
  if len(video_shape) != 5 or video_shape[-1] != 3:
    raise ValueError(f"video must be [batch, frames, height, width, 3], got {video_shape}.")
  b, t = video_shape[:2]
  if len(query_shape) != 3 or query_shape[0] != b or query_shape[2] != 3:
    raise ValueError(
      f"query_points must be [batch, points, 3] as (t, y, x) with the video's batch {b}, got "
      f"{query_shape} (video {video_shape})."
    )
  q = query_shape[1]
  for name, shape, want in (
    ("tracks", tracks_shape, (b, q, t, 2)),
    ("occluded", occluded_shape, (b, q, t)),
  ):
    if shape is not None and tuple(shape) != want:
      raise ValueError(
        f"{name} has shape {tuple(shape)}, but the video {video_shape} and query_points "
        f"{query_shape} need {want} ([batch, points, frames{', (x, y)' if name == 'tracks' else ''}"
        "]): the tracks must cover the video's frames, one row per query point."
      )


def check_queries(query_points_BQ3, num_frames: int, height: int, width: int) -> None:
  """ValueError naming the first query point outside the clip's frames or its pixels."""
  query = np.asarray(query_points_BQ3, np.float64)
  t, y, x = query[..., 0], query[..., 1], query[..., 2]
  problems = (
    (~np.isfinite(query).all(axis=-1), "is not finite"),
    (np.abs(t - np.round(t)) > 1e-3, "has a frame t that is not an integer"),
    ((np.round(t) < 0) | (np.round(t) >= num_frames), f"has t outside the clip [0, {num_frames})"),
    ((y < 0) | (y > height), f"has y outside the frame [0, {height}]"),
    ((x < 0) | (x > width), f"has x outside the frame [0, {width}]"),
  )
  for bad, what in problems:
    if bad.any():
      b, i = (int(v) for v in np.argwhere(bad)[0])
      raise ValueError(
        f"query point [{b}, {i}] = (t, y, x) {tuple(query[b, i].round(3))} {what}: query points "
        f"are (frame, row, column) in the clip's pixels ({num_frames} frames of {height}x{width})."
      )


# ----------------------------------------------------------------------------- the readout


def fourier_features(p_N2, bases: int):
  """[..., 2] in [0, 1] -> [..., 2 + 4 * bases]: p in [-1, 1], sin and cos of pi 2^k p."""
  p = 2.0 * p_N2 - 1.0
  freqs = jnp.asarray(np.pi * 2.0 ** np.arange(bases), jnp.float32).reshape((1,) * p.ndim + (-1,))
  angles = (p[..., None] * freqs).reshape(p.shape[:-1] + (2 * bases,))
  return jnp.concatenate([p, jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _mlp(x, hidden: int, out: int, name: str, zero_out: bool = False):
  """Dense(hidden) -> gelu -> Dense(out), in the caller's scope (names name_0, name_1)."""
  x = jax.nn.gelu(layers.dense(hidden, ("embed", "mlp"), jnp.float32, f"{name}_0")(x))
  init = nn.initializers.zeros_init() if zero_out else nn.initializers.lecun_normal()
  return nn.Dense(
    out,
    kernel_init=LOGICAL(init, ("mlp", None)),
    bias_init=LOGICAL(nn.initializers.zeros_init(), (None,)),
    name=f"{name}_1",
  )(x)


class TokenEmbedding(nn.Module):
  """Encoder tokens [..., L, c] -> keys and values [..., L, width]: LayerNorm, a projection,
  plus a Fourier embedding of each patch token's centre (a learned vector per prefix token)."""

  cfg: TrackerConfig
  grid: TokenGrid

  @nn.compact
  def __call__(self, tokens_XLC):
    g, w = self.grid, self.cfg.width
    x = layers.layer_norm(name="norm")(tokens_XLC.astype(jnp.float32))
    x = layers.dense(w, (None, "embed"), jnp.float32, "proj")(x)
    rows, cols = np.mgrid[: g.height, : g.width]
    centres = np.stack([(cols.ravel() + 0.5) / g.width, (rows.ravel() + 0.5) / g.height], -1)
    pos = layers.dense(w, (None, "embed"), jnp.float32, "pos")(
      fourier_features(jnp.asarray(centres, jnp.float32), self.cfg.fourier_bases)
    )
    if g.prefix:
      prefix = self.param(
        "prefix", LOGICAL(nn.initializers.normal(0.02), (None, "embed")), (g.prefix, w)
      )
      pos = jnp.concatenate([prefix, pos], axis=0)
    return x + pos.reshape((1,) * (x.ndim - 2) + pos.shape)


class TrackerCell(nn.Module):
  """One frame: states [b, q, w], keys [b, L, w] -> (next state, corrected state), both [b, q, w].

  Points whose query frame is t (query_t_BQ == t) start from their query embedding init_BQW.
  """

  cfg: TrackerConfig

  @nn.compact
  def __call__(self, state_BQW, kv_BLW, t, init_BQW, query_t_BQ):
    cfg = self.cfg
    heads, head_dim = cfg.num_heads, cfg.width // cfg.num_heads
    x = jnp.where((query_t_BQ == t)[..., None], init_BQW, state_BQW)
    for i in range(cfg.num_layers):
      y = layers.layer_norm(name=f"norm_q_{i}")(x)
      q = layers.HeadsProjection(heads, head_dim, name=f"query_{i}")(y)
      k = layers.HeadsProjection(heads, head_dim, name=f"key_{i}")(kv_BLW)
      v = layers.HeadsProjection(heads, head_dim, name=f"value_{i}")(kv_BLW)
      weights = layers.attention_weights(q, k, jnp.float32)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
      x = x + layers.OutProjection(cfg.width, name=f"out_{i}")(out)
      x = x + layers.Mlp(cfg.mlp_dim, name=f"mlp_{i}")(layers.layer_norm(name=f"norm_mlp_{i}")(x))
    corrected = x
    y = layers.Mlp(cfg.mlp_dim, name="predictor")(layers.layer_norm(name="norm_predictor")(x))
    return layers.layer_norm(name="norm_state")(corrected + y), corrected


def normalised_xy(query_points_BQ3, image_hw):
  """(t, y, x) pixels [..., 3] -> (x / w, y / h) [..., 2]."""
  h, w = image_hw
  return jnp.stack([query_points_BQ3[..., 2] / w, query_points_BQ3[..., 1] / h], axis=-1)


class QueryEmbedding(nn.Module):
  """Query points [b, q, 3] (t, y, x) -> the states [b, q, width] they start from."""

  cfg: TrackerConfig
  image_hw: tuple[int, int]

  @nn.compact
  def __call__(self, query_points_BQ3):
    cfg = self.cfg
    xy = normalised_xy(query_points_BQ3, self.image_hw)
    return _mlp(fourier_features(xy, cfg.fourier_bases), cfg.width, cfg.width, "mlp")


class TrackHeads(nn.Module):
  """Corrected states [T, b, q, width] -> dict(tracks [b, q, T, 2] as (x, y) pixels,
  occlusion_logits [b, q, T], certainty_logits [b, q, T])."""

  cfg: TrackerConfig
  image_hw: tuple[int, int]

  @nn.compact
  def __call__(self, corrected_TBQW, query_points_BQ3):
    cfg = self.cfg
    x = layers.layer_norm(name="norm")(corrected_TBQW)
    offset = _mlp(x, cfg.width, 2, "position", zero_out=True)
    logits = _mlp(x, cfg.width, 2, "logits")
    xy = normalised_xy(query_points_BQ3, self.image_hw)[None] + offset
    h, w = self.image_hw
    tracks = xy * jnp.asarray([w, h], jnp.float32).reshape(1, 1, 1, 2)
    return dict(
      tracks=einops.rearrange(tracks, "t b q c -> b q t c"),
      occlusion_logits=einops.rearrange(logits[..., 0], "t b q -> b q t"),
      certainty_logits=einops.rearrange(logits[..., 1], "t b q -> b q t"),
    )


class PointReadout(nn.Module):
  """Tokens [T, b, L, c] of frames t0 .. t0 + T - 1 and queries [b, q, 3] -> (TrackHeads'
  outputs, the state [b, q, width] after frame t0 + T - 1); state None: a new stream."""

  cfg: TrackerConfig
  grid: TokenGrid
  image_hw: tuple[int, int]

  def setup(self):
    cfg = self.cfg
    self.query_embed = QueryEmbedding(cfg, self.image_hw)
    self.token_embed = TokenEmbedding(cfg, self.grid)
    self.cell = nn.scan(
      TrackerCell,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=(0, 0, nn.broadcast, nn.broadcast),
      out_axes=0,
    )(cfg)
    self.heads = TrackHeads(cfg, self.image_hw)

  def __call__(self, tokens_TBLC, query_points_BQ3, t0, state_BQW=None):
    init = self.query_embed(query_points_BQ3)
    if state_BQW is None:
      state_BQW = init
    kv = self.token_embed(tokens_TBLC)
    frames = t0 + jnp.arange(tokens_TBLC.shape[0], dtype=jnp.int32)
    query_t = jnp.round(query_points_BQ3[..., 0]).astype(jnp.int32)
    state_BQW, corrected = self.cell(state_BQW, kv, frames, init, query_t)
    return self.heads(corrected, query_points_BQ3), state_BQW


class PointTrackingModel(nn.Module):
  """Frozen encoder + PointReadout: (video [b, t, h, w, 3], queries [b, q, 3]) -> outputs.

  backbone: the family's module (unbound); its parameters keep their own top-level names (shared
  scope), so an encoder trained as a classifier or by MAE loads path by path.
  """

  backbone: nn.Module
  tracker: TrackerConfig
  grid: TokenGrid
  image_size: int

  def setup(self):
    self.net = self.backbone.clone()
    nn.share_scope(self, self.net)
    self.readout = PointReadout(self.tracker, self.grid, (self.image_size, self.image_size))

  def encode(self, video_BTHWC):
    """Frozen per-frame tokens [t, b, L, c] (a time slot's tokens repeated for its frames)."""
    tokens = jax.lax.stop_gradient(self.net.tokens(video_BTHWC))
    t, slots = video_BTHWC.shape[1], tokens.shape[1]
    if t % slots:
      raise ValueError(f"{t} frames do not split into the encoder's {slots} time slots.")
    return jnp.moveaxis(jnp.repeat(tokens, t // slots, axis=1), 1, 0)

  def __call__(self, video_BTHWC, query_points_BQ3, train: bool = False):
    """dict(tracks [b, q, t, 2], occlusion_logits [b, q, t], certainty_logits [b, q, t])."""
    del train  # no dropout in the readout
    check_shapes(video_BTHWC.shape, query_points_BQ3.shape)
    outputs, _ = self.readout(self.encode(video_BTHWC), query_points_BQ3, 0)
    return outputs

  def step(self, frame_BHWC, query_points_BQ3, t, state=None):
    """One frame t of a stream: (outputs with a frames axis of 1, state); state None starts.

    The encoder must step with a carried state (`encode(video, state)`, e.g. TRecViT's).
    """
    check_shapes(frame_BHWC[:, None].shape, query_points_BQ3.shape)
    encoder_state, readout_state = (None, None) if state is None else state
    tokens, encoder_state = self.net.encode(frame_BHWC[:, None], encoder_state)
    tokens = jnp.moveaxis(jax.lax.stop_gradient(tokens), 1, 0)
    outputs, readout_state = self.readout(tokens, query_points_BQ3, t, readout_state)
    return outputs, (encoder_state, readout_state)


# ----------------------------------------------------------------------------- predictions


def predicted_occluded(outputs) -> jax.Array:
  """bool [b, q, t]: visible when P(visible) * P(certain) > 0.5."""
  visible = jax.nn.sigmoid(-outputs["occlusion_logits"]) * jax.nn.sigmoid(
    outputs["certainty_logits"]
  )
  return visible <= 0.5


def track(model: PointTrackingModel, params, video_BTHWC, query_points_BQ3) -> dict:
  """The whole clip at once: numpy tracks [b, q, t, 2], occluded [b, q, t] and the logits."""
  video = np.asarray(video_BTHWC, np.float32)
  check_shapes(video.shape, np.shape(query_points_BQ3))
  check_queries(query_points_BQ3, *video.shape[1:4])
  outputs = _track_jit(model, params, video, jnp.asarray(query_points_BQ3, jnp.float32))
  return jax.tree.map(np.asarray, outputs)


@functools.partial(jax.jit, static_argnums=0)
def _track_jit(model, params, video, query):
  outputs = model.apply({"params": params}, video, query)
  return dict(outputs, occluded=predicted_occluded(outputs))


def can_stream(model: PointTrackingModel) -> str | None:
  """None when the model tracks frame by frame, else the reason it cannot."""
  encode = getattr(type(model.backbone), "encode", None)
  if encode is None or "state" not in inspect.signature(encode).parameters:
    return (
      f"the encoder {type(model.backbone).__name__} has no encode(video, state) that carries a "
      "recurrent state from frame to frame (TRecViT has)"
    )
  patch_t = getattr(getattr(model.backbone, "cfg", None), "patch_size", (1,))[0]
  if patch_t != 1:
    return f"frame by frame needs temporal patch size 1, got {patch_t}"
  return None


def track_frame_by_frame(
  model: PointTrackingModel, params, video_BTHWC, query_points_BQ3
) -> dict[str, np.ndarray]:
  """`track`'s outputs computed one frame at a time, carrying the encoder's and the readout's
  state (constant memory in the video length)."""
  if reason := can_stream(model):
    raise ValueError(f"track_frame_by_frame: {reason}; use track() for the whole clip.")
  video = np.asarray(video_BTHWC, np.float32)
  check_shapes(video.shape, np.shape(query_points_BQ3))
  check_queries(query_points_BQ3, *video.shape[1:4])
  query = jnp.asarray(query_points_BQ3, jnp.float32)
  per_frame, state = [], None
  for t in range(video.shape[1]):
    outputs, state = _step_jit(model, params, jnp.asarray(video[:, t]), query, t, state)
    per_frame.append(jax.tree.map(np.asarray, outputs))
  return {k: np.concatenate([o[k] for o in per_frame], axis=2) for k in per_frame[0]}


@functools.partial(jax.jit, static_argnums=0)
def _step_jit(model, params, frame, query, t, state):
  outputs, state = model.apply(
    {"params": params}, frame, query, t, state, method=PointTrackingModel.step
  )
  return dict(outputs, occluded=predicted_occluded(outputs)), state


# ----------------------------------------------------------------------------- loss and metrics


def _from_query_BQT(query_points_BQ3, num_frames: int, strict: bool):
  """bool [b, q, t]: frames at (strict: after) each point's query frame."""
  query_t = jnp.round(query_points_BQ3[..., 0]).astype(jnp.int32)[..., None]
  frames = jnp.arange(num_frames, dtype=jnp.int32).reshape(1, 1, num_frames)
  return frames > query_t if strict else frames >= query_t


def _to_raster(tracks_BQT2, image_hw):
  h, w = image_hw
  return tracks_BQT2 * jnp.asarray([RASTER / w, RASTER / h], jnp.float32).reshape(1, 1, 1, 2)


def loss_terms(outputs, batch, image_hw) -> dict[str, jax.Array]:
  """Per-video sums and counts [b] of the three loss terms (see the module docstring)."""
  gt_occluded = batch["occluded"]
  num_frames = gt_occluded.shape[-1]
  trained = _from_query_BQT(batch["query_points"], num_frames, strict=False)
  trained = trained & batch["point_mask"][..., None]
  visible = trained & ~gt_occluded
  pred = _to_raster(outputs["tracks"].astype(jnp.float32), image_hw)
  gt = _to_raster(batch["tracks"], image_hw)
  dist = jnp.sqrt(jnp.sum(jnp.square(pred - gt), axis=-1) + 1e-12)
  huber = jnp.where(
    dist < HUBER_DELTA_PX,
    0.5 * jnp.square(dist),
    HUBER_DELTA_PX * (dist - 0.5 * HUBER_DELTA_PX),
  )
  occlusion = optax.sigmoid_binary_cross_entropy(
    outputs["occlusion_logits"].astype(jnp.float32), gt_occluded.astype(jnp.float32)
  )
  certain = jax.lax.stop_gradient(dist) < CERTAINTY_PX
  certainty = optax.sigmoid_binary_cross_entropy(
    outputs["certainty_logits"].astype(jnp.float32), certain.astype(jnp.float32)
  )

  def total(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0), axis=(1, 2))

  return dict(
    position=total(huber, visible),
    occlusion=total(occlusion, trained),
    certainty=total(certainty, visible),
    visible=jnp.sum(visible, axis=(1, 2)).astype(jnp.float32),
    trained=jnp.sum(trained, axis=(1, 2)).astype(jnp.float32),
  )


def tapvid_sums(
  query_points_BQ3,
  gt_occluded_BQT,
  gt_tracks_BQT2,
  pred_occluded_BQT,
  pred_tracks_BQT2,
  point_mask_BQ,
  mask_B,
) -> dict[str, jax.Array]:
  """compute_tapvid_metrics (query mode "first", tracks in 256x256 pixels) per video, summed over
  the real videos (mask) where every metric is defined, and their `count`; points with
  point_mask False are not evaluated."""
  num_frames = gt_occluded_BQT.shape[-1]
  evaluated = _from_query_BQT(query_points_BQ3, num_frames, strict=True)
  evaluated = evaluated & point_mask_BQ[..., None]

  def count(m):
    return jnp.sum(m & evaluated, axis=(1, 2)).astype(jnp.float32)

  gt_visible, pred_visible = ~gt_occluded_BQT, ~pred_occluded_BQT
  num_visible = count(gt_visible)
  valid = mask_B & (num_visible > 0)
  safe = jnp.maximum(num_visible, 1.0)
  per_video = {"occlusion_accuracy": count(gt_occluded_BQT == pred_occluded_BQT)}
  per_video["occlusion_accuracy"] /= jnp.maximum(count(jnp.ones_like(gt_visible)), 1.0)
  sq_dist = jnp.sum(
    jnp.square(pred_tracks_BQT2.astype(jnp.float32) - gt_tracks_BQT2.astype(jnp.float32)), -1
  )
  for thresh in tapvid.THRESHOLDS_PX:
    within = sq_dist < thresh**2
    true_pos = count(within & gt_visible & pred_visible)
    false_pos = count(pred_visible & (gt_occluded_BQT | ~within))
    per_video[f"pts_within_{thresh}"] = count(within & gt_visible) / safe
    per_video[f"jaccard_{thresh}"] = true_pos / (safe + false_pos)
  for name, prefix in (("average_jaccard", "jaccard"), ("average_pts_within_thresh", "pts_within")):
    per_video[name] = sum(per_video[f"{prefix}_{x}"] for x in tapvid.THRESHOLDS_PX) / len(
      tapvid.THRESHOLDS_PX
    )
  weight = valid.astype(jnp.float32)
  sums = {k: jnp.sum(v * weight) for k, v in per_video.items()}
  sums["count"] = jnp.sum(weight)
  return sums


def stationary_metrics(
  data_path: str, split: str, *, num_frames: int, stride: int, image_size: int, num_points: int
) -> dict[str, float]:
  """The "point stays where it was queried, always visible" baseline on an eval split, with the
  task's metric (mean over videos of compute_tapvid_metrics, the same videos counted)."""
  it = pipeline.eval_iterator(
    data_path,
    split,
    global_batch_size=8,
    num_frames=num_frames,
    stride=stride,
    image_size=image_size,
    num_points=num_points,
    worker_count=0,
  )
  scale = RASTER / image_size
  per_video: dict[str, list[np.ndarray]] = {}
  for batch in it:
    query = batch["query_points"]
    xy = np.stack([query[..., 2], query[..., 1]], -1)
    pred = np.repeat(xy[:, :, None], num_frames, axis=2)
    metrics = tapvid.compute_tapvid_metrics(
      query,
      batch["occluded"],
      batch["tracks"] * scale,
      np.zeros_like(batch["occluded"]),
      pred * scale,
      "first",
    )
    valid = batch["mask"] & np.all([np.isfinite(v) for v in metrics.values()], axis=0)
    for k, v in metrics.items():
      per_video.setdefault(k, []).append(v[valid])
  return {k: float(np.mean(np.concatenate(v))) for k, v in per_video.items()}


# ----------------------------------------------------------------------------- images


def draw_tracks(
  video_BTHWC, gt_tracks, gt_shown_BQT, pred_tracks, pred_shown_BQT, scale: int
) -> jax.Array:
  """uint8 [b, h * scale, t * w * scale, 3]: the frames side by side, upscaled, with the true
  points as green squares and the predicted ones as smaller red squares on top."""
  b, t, h, w, _ = video_BTHWC.shape
  frames = jnp.repeat(jnp.repeat(video_BTHWC.astype(jnp.float32), scale, 2), scale, 3)
  ys = (jnp.arange(h * scale, dtype=jnp.float32) + 0.5).reshape(1, 1, 1, -1, 1)
  xs = (jnp.arange(w * scale, dtype=jnp.float32) + 0.5).reshape(1, 1, 1, 1, -1)

  def squares(tracks_BQT2, shown_BQT, radius):
    x = (tracks_BQT2[..., 0] * scale)[..., None, None]
    y = (tracks_BQT2[..., 1] * scale)[..., None, None]
    inside = (jnp.abs(xs - x) <= radius) & (jnp.abs(ys - y) <= radius)
    return jnp.any(inside & shown_BQT[..., None, None], axis=1)[..., None]  # [b, t, H, W, 1]

  radius = max(1.0, scale / 2)
  green = jnp.asarray([0.0, 1.0, 0.0], jnp.float32).reshape(1, 1, 1, 1, 3)
  red = jnp.asarray([1.0, 0.0, 0.0], jnp.float32).reshape(1, 1, 1, 1, 3)
  frames = jnp.where(squares(gt_tracks, gt_shown_BQT, radius + 1), green, frames)
  frames = jnp.where(squares(pred_tracks, pred_shown_BQT, radius), red, frames)
  grid = einops.rearrange(frames, "b t h w c -> b h (t w) c")
  return jnp.round(jnp.clip(grid, 0.0, 1.0) * 255.0).astype(jnp.uint8)


# ----------------------------------------------------------------------------- the task


@flax.struct.dataclass
class TrackingTrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")
  position_loss: clu_metrics.Average.from_output("position_loss")
  occlusion_loss: clu_metrics.Average.from_output("occlusion_loss")
  certainty_loss: clu_metrics.Average.from_output("certainty_loss")


def _eval_video(video):
  """The eval pipeline's [b, 1, t, h, w, 3] (one view with point tracks) -> [b, t, h, w, 3]."""
  return video[:, 0] if video.ndim == 6 else video


class PointTracking(Task):
  """TAP-Vid point tracking on a frozen encoder (config.tracking: see DEFAULTS)."""

  name = "point_tracking"
  needs_labels = False
  fresh_prefixes = (f"{READOUT}/",)
  train_metrics = TrackingTrainMetrics
  image_tag = "eval/tracks_true_green_predicted_red"

  @property
  def settings(self) -> dict[str, Any]:
    return settings(self.config)

  @property
  def tracker(self) -> TrackerConfig:
    s = self.settings
    return TrackerConfig(
      width=s["width"],
      num_layers=s["num_layers"],
      num_heads=s["num_heads"],
      mlp_dim=s["mlp_dim"],
      fourier_bases=s["fourier_bases"],
    )

  def _grid(self) -> TokenGrid:
    d = self.config.data
    return self.family.token_grid(self.model_cfg, d.num_frames, d.image_size)

  def config_errors(self, mesh_shape):
    del mesh_shape
    try:
      s = self.settings
    except ValueError as e:
      return [str(e)]
    d, errors = self.config.data, []
    if not self.config.init_from and not s["fresh_encoder"]:
      errors.append(
        "task=point_tracking needs init_from (an MAE workdir or an official .npz), or "
        "tracking.fresh_encoder=True to read a random-init encoder (a baseline)"
      )
    if d.eval_clips * d.eval_crops != 1:
      errors.append(
        f"task=point_tracking evaluates one view per video (tracks are per clip and crop): set "
        f"data.eval_clips=1 and data.eval_crops=1, got {d.eval_clips} x {d.eval_crops}"
      )
    for key in ("num_points", "eval_num_points", "num_layers", "fourier_bases"):
      if s[key] < 1:
        errors.append(f"tracking.{key} must be >= 1, got {s[key]}")
    if s["width"] % s["num_heads"]:
      errors.append(
        f"tracking.width {s['width']} is not divisible by tracking.num_heads {s['num_heads']}"
      )
    slots = self._grid().frames
    if slots < 1 or d.num_frames % slots:
      errors.append(
        f"data.num_frames {d.num_frames} does not split into the encoder's {slots} time slots"
      )
    return errors

  def build_model(self):
    return PointTrackingModel(
      self.family.build(self.model_cfg), self.tracker, self._grid(), self.config.data.image_size
    )

  def init_inputs(self):
    d = self.config.data
    video = jnp.zeros((1, d.num_frames, d.image_size, d.image_size, 3), jnp.float32)
    return video, jnp.zeros((1, self.settings["num_points"], 3), jnp.float32)

  def optimizer(self, tx):
    return frozen_encoder_tx(tx)

  def data_options(self, train):
    return {"num_points": self.settings["num_points" if train else "eval_num_points"]}

  def batch_spec(self, batch_size, train):
    d = self.config.data
    q = self.settings["num_points" if train else "eval_num_points"]
    t, s = d.num_frames, d.image_size
    video = (batch_size, t, s, s, 3) if train else (batch_size, 1, t, s, s, 3)
    spec = dict(
      video=jax.ShapeDtypeStruct(video, jnp.float32),
      tracks=jax.ShapeDtypeStruct((batch_size, q, t, 2), jnp.float32),
      occluded=jax.ShapeDtypeStruct((batch_size, q, t), jnp.bool_),
      query_points=jax.ShapeDtypeStruct((batch_size, q, 3), jnp.float32),
      point_mask=jax.ShapeDtypeStruct((batch_size, q), jnp.bool_),
    )
    if not train:
      spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
    return spec

  def _outputs(self, model, params, batch):
    video = _eval_video(batch["video"])
    shapes = (batch[k].shape for k in ("query_points", "tracks", "occluded"))
    check_shapes(video.shape, *shapes)
    return model.apply({"params": params}, video, batch["query_points"]), video.shape[2:4]

  def loss(self, model, params, batch, rng):
    del rng
    outputs, image_hw = self._outputs(model, params, batch)
    terms = jax.tree.map(jnp.sum, loss_terms(outputs, batch, image_hw))
    position = terms["position"] / jnp.maximum(terms["visible"], 1.0)
    occlusion = terms["occlusion"] / jnp.maximum(terms["trained"], 1.0)
    certainty = terms["certainty"] / jnp.maximum(terms["visible"], 1.0)
    loss = self.settings["huber_weight"] * position + occlusion + certainty
    aux = dict(position_loss=position, occlusion_loss=occlusion, certainty_loss=certainty)
    return loss, aux

  def eval_sums(self, model, params, batch, rng):
    del rng
    outputs, image_hw = self._outputs(model, params, batch)
    sums = tapvid_sums(
      batch["query_points"],
      batch["occluded"],
      _to_raster(batch["tracks"], image_hw),
      predicted_occluded(outputs),
      _to_raster(outputs["tracks"].astype(jnp.float32), image_hw),
      batch["point_mask"],
      batch["mask"],
    )
    # The loss of each video (normalised within it), over the same videos as the metrics.
    terms = loss_terms(outputs, batch, image_hw)
    per_video = (
      self.settings["huber_weight"] * terms["position"] / jnp.maximum(terms["visible"], 1.0)
      + terms["occlusion"] / jnp.maximum(terms["trained"], 1.0)
      + terms["certainty"] / jnp.maximum(terms["visible"], 1.0)
    )
    evaluated = _from_query_BQT(batch["query_points"], batch["occluded"].shape[-1], strict=True)
    visible = evaluated & ~batch["occluded"] & batch["point_mask"][..., None]
    valid = batch["mask"] & jnp.any(visible, axis=(1, 2))
    sums["loss"] = jnp.sum(jnp.where(valid, per_video, 0.0))
    return sums

  def images(self, model, params, batch, rng):
    del rng
    s = self.settings
    n, q = s["image_videos"], s["image_points"]
    batch = {k: v[:n] for k, v in batch.items()}
    batch.update({k: batch[k][:, :q] for k in ("tracks", "occluded", "query_points", "point_mask")})
    outputs, image_hw = self._outputs(model, params, batch)
    t = batch["occluded"].shape[-1]
    shown = _from_query_BQT(batch["query_points"], t, strict=False) & batch["point_mask"][..., None]
    scale = max(1, 128 // max(image_hw))
    return draw_tracks(
      _eval_video(batch["video"]),
      batch["tracks"],
      shown & ~batch["occluded"],
      outputs["tracks"].astype(jnp.float32),
      shown & ~predicted_occluded(outputs),
      scale,
    )

  def train_flops_per_clip(self):
    """The encoder forward once, plus 3x (forward and backward) the readout's matmuls and
    attention per frame."""
    d, cfg, tr = self.config.data, self.model_cfg, self.tracker
    grid = self._grid()
    tokens = grid.prefix + grid.height * grid.width
    width = getattr(cfg, "width", tr.width)
    q, w, m = self.settings["num_points"], tr.width, tr.mlp_dim
    per_layer = 2 * q * w * w * 2 + 2 * 2 * tokens * w * w + 2 * 2 * q * tokens * w
    per_layer += 2 * 2 * q * w * m
    per_frame = 2 * tokens * width * w + tr.num_layers * per_layer + 2 * 2 * q * w * m
    encoder = self.family.forward_flops(cfg, d.num_frames, d.image_size, head=False)
    return float(encoder + 3 * d.num_frames * per_frame)


TASK = PointTracking
