"""Inference: whole videos cut into clips, or one frame at a time with a carried recurrent state.

A video of T frames is cut into max(T // frames_per_clip, 1) clips (trailing frames that do not
fill a clip are dropped, as the official model does), each run from a fresh recurrent state; logits
and probabilities are each averaged over clips.

The frame-by-frame step keeps, per layer, the LRU state [(b n), lru_width] and the conv1d window
[(b n), W-1, lru_width], plus the running sum of per-frame pre-logits: memory is constant in the
video length.

A trained workdir (any model family and task): `read_config` gives the config saved with its
newest checkpoint, `load_trained` the model built from it through the registries and its
parameters only (a partial restore: no optimizer state is read). predict.py and `official export`
use them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from trecvit_dist import checkpointing, experiment
from trecvit_dist.models import TRecViT, TRecViTConfig, check_video
from trecvit_dist.tasks.task import Task

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


# ----------------------------------------------------------------------------- trained workdirs


class WorkdirError(ValueError):
  """A workdir that holds no usable trained model; the message says what to do."""


@dataclasses.dataclass
class Trained:
  """A trained workdir's model: its run config, task, module and parameters (on one device)."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  task: Task
  model: nn.Module
  params: Params  # nested, as model.apply takes them
  num_classes: int


class _DropMessages(logging.Filter):
  """Drops log records whose message contains one of the given texts."""

  def __init__(self, *texts: str):
    super().__init__()
    self.texts = texts

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(t in message for t in self.texts)


def _checkpointer(workdir: str) -> checkpointing.Checkpointer:
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    raise WorkdirError(
      f"No checkpoint in {workdir}: {directory} does not exist. Pass the --workdir of a trained "
      "run (python -m trecvit_dist.main --config ... --workdir DIR writes one)."
    )
  # Orbax warns that a read-only manager is read-only: expected here, so not shown.
  quiet = _DropMessages("read_only=True", "is read only")
  logging.getLogger("absl").addFilter(quiet)
  try:
    ckpt = checkpointing.Checkpointer(workdir, every_steps=0, keep=1, read_only=True)
  finally:
    logging.getLogger("absl").removeFilter(quiet)
  if not ckpt.steps():
    ckpt.close()
    raise WorkdirError(
      f"No checkpoint in {directory} (no complete step directory): let the run reach its first "
      "checkpoint (checkpoint_every_steps, or the end of training) and try again."
    )
  return ckpt


def read_config(workdir: str) -> tuple[int, ml_collections.ConfigDict]:
  """(step, run config) of the workdir's newest checkpoint; WorkdirError when there is none."""
  ckpt = _checkpointer(workdir)
  try:
    step = ckpt.steps()[-1]
    try:
      restored = ckpt.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 (a missing or unreadable item: many error types)
      raise WorkdirError(
        f"Checkpoint {ckpt.directory / str(step)} has no readable `config` item "
        f"({type(e).__name__}): it is damaged or was not written by `python -m trecvit_dist.main`, "
        "which saves the run's config with every checkpoint."
      ) from e
  finally:
    ckpt.close()
  return step, ml_collections.ConfigDict(restored.config)


def _flat_shapes(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """{"a/b": shape} of nested mappings of arrays or Orbax array metadata."""
  flat = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      flat.update(_flat_shapes(v, f"{prefix}{k}/"))
    else:
      flat[f"{prefix}{k}"] = tuple(v.shape)
  return flat


def abstract_params(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """Flat {"a/b": ShapeDtypeStruct} of the parameters the run's task builds (shapes only)."""
  task = experiment.make_task(config, num_classes)
  model = task.build_model()
  params = jax.eval_shape(
    lambda: nn.meta.unbox(model.init(jax.random.key(0), *task.init_inputs())["params"])
  )
  return flax.traverse_util.flatten_dict(params, sep="/")


def saved_num_classes(config: ml_collections.ConfigDict, saved: dict[str, tuple]) -> int:
  """The class count of a saved model: the size of its class axis (1 when it has none, e.g. MAE).

  Read from the checkpoint rather than DATA/classes.txt, which may have moved or changed since.
  """
  one, two = abstract_params(config, 1), abstract_params(config, 2)
  for key, s in one.items():
    if key in saved and s.shape != two[key].shape:
      axis = next(i for i, (a, b) in enumerate(zip(s.shape, two[key].shape, strict=True)) if a != b)
      return int(saved[key][axis])
  return 1


def load_trained(
  workdir: str,
  config: ml_collections.ConfigDict | None = None,
  *,
  prefixes: tuple[str, ...] = (),
  device: jax.Device | None = None,
) -> Trained:
  """The newest checkpoint's model and parameters (only `params`: no optimizer state is read).

  config: the run's config when already read (`read_config`). prefixes: restore only parameters
  whose path starts with one of them (e.g. ("tokenizer/", "encoder/")). The parameters land on
  `device` (default: the first). WorkdirError when the checkpoint does not hold what the config
  builds.
  """
  if config is None:
    _, config = read_config(workdir)
  ckpt = _checkpointer(workdir)
  try:
    step = ckpt.steps()[-1]
    saved = _flat_shapes(ckpt.manager.item_metadata(step)["state"]["params"])
    num_classes = saved_num_classes(config, saved)
    wanted = {
      k: v
      for k, v in abstract_params(config, num_classes).items()
      if not prefixes or k.startswith(prefixes)
    }
    placement = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    like = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placement) for k, v in wanted.items()
    }
    step, flat = ckpt.load_params(like)
  finally:
    ckpt.close()
  missing = sorted(set(like) - set(flat))
  if missing:
    raise WorkdirError(
      f"The checkpoint of step {step} in {workdir} lacks {len(missing)} parameter(s) that its own "
      f"config builds (or has them in another shape), e.g. {missing[:5]}: the model code changed "
      "since it was written, or the config item does not belong to it."
    )
  task = experiment.make_task(config, num_classes)
  return Trained(
    workdir=str(workdir),
    step=step,
    config=config,
    task=task,
    model=task.build_model(),
    params=flax.traverse_util.unflatten_dict(flat, sep="/"),
    num_classes=num_classes,
  )
