"""Inference: whole videos cut into clips, or one frame at a time with a carried recurrent state.

A video of T frames is cut into max(T // frames_per_clip, 1) clips (trailing frames that do not
fill a clip are dropped, as the official model does), each run from a fresh recurrent state; logits
and probabilities are each averaged over clips.

The frame-by-frame step keeps, per layer, the LRU state [(b n), lru_width] and the conv1d window
[(b n), W-1, lru_width], plus the running sum of per-frame pre-logits: memory is constant in the
video length.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trecvit_dist.models import TRecViT, TRecViTConfig, check_video

Params = Any


def split_clips(cfg: TRecViTConfig, num_frames: int) -> tuple[int, int]:
  """(num_clips, frames per clip) for a video of num_frames frames."""
  if num_frames < cfg.frames_per_clip:
    return 1, num_frames
  return num_frames // cfg.frames_per_clip, cfg.frames_per_clip


def predict(cfg: TRecViTConfig, params: Params, video_BTHWC) -> dict[str, jax.Array]:
  """Whole-video prediction: logits, probs [b, classes], encoded [b, t', n, c], pre_logits."""
  check_video(cfg, video_BTHWC.shape)
  return _predict_jit(cfg, params, jnp.asarray(video_BTHWC, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _predict_jit(cfg, params, video):
  model = TRecViT(cfg)
  b, t = video.shape[:2]
  clips, per_clip = split_clips(cfg, t)
  clip_video = video[:, : clips * per_clip].reshape((b * clips, per_clip) + video.shape[2:])
  encoded, _ = model.apply({"params": params}, clip_video, method=TRecViT.encode)
  features = model.apply({"params": params}, encoded, method=TRecViT.frame_features)
  pre_logits = jnp.mean(features, axis=1)
  logits = model.apply({"params": params}, pre_logits, method=TRecViT.classify)
  logits = logits.reshape(b, clips, -1)
  return dict(
    logits=jnp.mean(logits, axis=1),
    probs=jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1),
    encoded=encoded.reshape((b, clips * per_clip) + encoded.shape[2:]),
    pre_logits=pre_logits.reshape(b, clips, -1),
  )


def make_frame_step(cfg: TRecViTConfig):
  """Returns jitted step(params, frame [b, h, w, 3], state) -> (outputs, state); state None starts.

  outputs: encoded [b, n, c] of this frame, and logits/probs of the clip so far (mean of the
  per-frame pre-logits up to this frame, exactly what the whole-clip model computes at its end).
  """
  if cfg.patch_size[0] != 1:
    raise ValueError(f"frame-by-frame needs temporal patch size 1, got {cfg.patch_size[0]}.")
  model = TRecViT(cfg)

  @jax.jit
  def step(params, frame_BHWC, state):
    video = frame_BHWC[:, None].astype(jnp.float32)
    layers = None if state is None else state["layers"]
    encoded, layers = model.apply({"params": params}, video, layers, method=TRecViT.encode)
    feature = model.apply({"params": params}, encoded, method=TRecViT.frame_features)[:, 0]
    if state is None:
      feature_sum, count = feature, jnp.ones((), jnp.float32)
    else:
      feature_sum, count = state["feature_sum"] + feature, state["count"] + 1.0
    logits = model.apply({"params": params}, feature_sum / count, method=TRecViT.classify)
    outputs = dict(encoded=encoded[:, 0], logits=logits, probs=jax.nn.softmax(logits, axis=-1))
    return outputs, dict(layers=layers, feature_sum=feature_sum, count=count)

  return step


def predict_frame_by_frame(
  cfg: TRecViTConfig, params: Params, video_BTHWC
) -> dict[str, np.ndarray]:
  """The same outputs as `predict`, computed one frame at a time with a carried state."""
  check_video(cfg, video_BTHWC.shape)
  step = make_frame_step(cfg)
  t = video_BTHWC.shape[1]
  clips, per_clip = split_clips(cfg, t)
  clip_logits, clip_probs, encoded = [], [], []
  for c in range(clips):
    state = None  # every clip starts from a fresh recurrent state
    for i in range(per_clip):
      outputs, state = step(params, jnp.asarray(video_BTHWC[:, c * per_clip + i]), state)
      encoded.append(np.asarray(outputs["encoded"]))
    clip_logits.append(np.asarray(outputs["logits"]))
    clip_probs.append(np.asarray(outputs["probs"]))
  return dict(
    logits=np.mean(clip_logits, axis=0),
    probs=np.mean(clip_probs, axis=0),
    encoded=np.stack(encoded, axis=1),
  )
