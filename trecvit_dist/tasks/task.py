"""What a task tells the trainer: `Task`, subclassed once per module under trecvit_dist/tasks/.

A task owns the model it builds around a family's encoder, its loss, its evaluation sums and
metric names, its TensorBoard images, the batch keys it reads (with shapes), which parameters
train, which heads start fresh under init_from, and its config checks. The trainer, the builder
(experiment.py) and compile_check call only the methods below, never a task by name.

Batches are dicts of global arrays whose leading axis is the batch: train batches as
`batch_spec(b, train=True)` declares, eval batches as `batch_spec(b, train=False)` (the eval
pipeline's views axis included) plus `mask` [b] (False on padding rows).
"""

from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from trecvit_dist.models.family import ModelFamily


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


class Task:
  """Base class; see the module docstring. Defaults suit a supervised video classifier."""

  name: ClassVar[str] = ""
  needs_labels: ClassVar[bool] = True  # reads DATA/classes.txt and refuses label -1
  # Parameter subtrees besides the family's classifier that may start fresh under init_from.
  fresh_prefixes: ClassVar[tuple[str, ...]] = ()
  train_metrics: ClassVar[type[clu_metrics.Collection]] = TrainMetrics
  image_tag: ClassVar[str | None] = None  # TensorBoard tag of `images`, None: no images

  def __init__(self, config: ml_collections.ConfigDict, family: ModelFamily, model_cfg: Any):
    self.config, self.family, self.model_cfg = config, family, model_cfg

  # --- config and model

  def config_errors(self, mesh_shape: dict[str, int]) -> list[str]:
    """Errors in the task's part of the config (the family and the trainer check theirs)."""
    del mesh_shape
    return []

  def build_model(self) -> nn.Module:
    return self.family.build(self.model_cfg)

  def init_inputs(self) -> tuple:
    """Positional inputs of model.init after the RNG (shapes only matter)."""
    d = self.config.data
    return (jnp.zeros((1, d.num_frames, d.image_size, d.image_size, 3), jnp.float32),)

  def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The optimizer of this task's parameters (e.g. nothing for a frozen encoder)."""
    return tx

  def data_options(self, train: bool) -> dict[str, Any]:
    """Keyword arguments for pipeline.train_iterator / eval_iterator beyond the config's data
    fields (e.g. num_points for point tracks, num_frames for longer eval clips)."""
    del train
    return {}

  def batch_spec(self, batch_size: int, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of the batch keys this task reads."""
    d = self.config.data
    clip = (d.num_frames, d.image_size, d.image_size, 3)
    if train:
      video = jax.ShapeDtypeStruct((batch_size, *clip), jnp.float32)
    else:
      views = d.eval_clips * d.eval_crops
      video = jax.ShapeDtypeStruct((batch_size, views, *clip), jnp.float32)
    spec = dict(video=video)
    if self.needs_labels:
      spec["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if not train:
      spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
    return spec

  # --- training and evaluation

  def loss(self, model: nn.Module, params, batch: dict, rng) -> tuple[jax.Array, dict]:
    """(scalar loss, aux scalars for train_metrics) of one train batch."""
    raise NotImplementedError

  def eval_sums(self, model: nn.Module, params, batch: dict, rng) -> dict[str, jax.Array]:
    """Sums over the batch's real rows of each eval metric, and their `count`."""
    raise NotImplementedError

  def images(self, model: nn.Module, params, batch: dict, rng) -> jax.Array:
    """uint8 [n, h, w, 3] for TensorBoard (only when image_tag is set)."""
    raise NotImplementedError

  def train_flops_per_clip(self) -> float:
    """Analytic train FLOPs of one clip (behind perf/mfu): forward + backward = 3x forward."""
    d = self.config.data
    return 3.0 * self.family.forward_flops(self.model_cfg, d.num_frames, d.image_size)


def flatten_views(video):
  """[B, views, T, H, W, 3] (the eval pipeline's) -> ([B * views, ...], views); 5-D as is."""
  if video.ndim == 6:
    return video.reshape((video.shape[0] * video.shape[1],) + video.shape[2:]), video.shape[1]
  return video, 1
