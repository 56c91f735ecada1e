"""Supervised classification: cross-entropy (with label smoothing), top-1 / top-5 over views.

Train batch: video [B, T, H, W, 3], label [B]. Eval batch: video [B, views, T, H, W, 3], label
[B], mask [B]; the logits are averaged over the views (temporal clips x spatial crops) before the
top-k. The model is the family's classifier as it is.

With data.mixture (data_pipelines/mixture.py: datasets with weights and head names), the model is
`MixtureClassifier`: the family's `tokens()` (families expose no pre-logits features, so the
pooling is this task's: attention pooling over every token, pool/), then one classifier head per
head name (heads/<name>/, the family's ClassifierHead layout with its rep_size and dropout). The
task seen by the builder reads member 0; `member_task(i)` is the same task for member i (its
frames in the batch spec and data options, its head in the loss and eval), so the trainer
compiles one step per distinct (head, frames). Parameters and optimizer state are shared.
"""

from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data_pipelines import mixture
from trecvit_dist.models import layers
from trecvit_dist.tasks.task import Task, flatten_views

HEADS = "heads"
POOL = "pool"


def cross_entropy(logits, labels, num_classes: int, smoothing: float):
  """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def top_k_sums(logits_BK, label_B, mask_B) -> dict:
  """Sums of loss, top1 and top5 over the real rows (mask), and their count. No top5 with at
  most 5 classes: it would always be 1."""
  mask = mask_B.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BK, jnp.maximum(label_B, 0))
  top5 = jax.lax.top_k(logits_BK, min(5, logits_BK.shape[-1]))[1]
  correct1 = (top5[:, 0] == label_B).astype(jnp.float32)
  sums = dict(loss=jnp.sum(loss * mask), top1=jnp.sum(correct1 * mask), count=jnp.sum(mask))
  if logits_BK.shape[-1] > 5:
    correct5 = jnp.any(top5 == label_B[:, None], axis=-1).astype(jnp.float32)
    sums["top5"] = jnp.sum(correct5 * mask)
  return sums


def view_averaged_logits(model, params, video, **kwargs):
  """Logits [B, classes] in float32, averaged over the views of [B, views, T, H, W, 3]
  (kwargs: the model's, e.g. head= of a MixtureClassifier)."""
  b = video.shape[0]
  flat, views = flatten_views(video)
  logits = model.apply({"params": params}, flat, **kwargs)
  return jnp.mean(logits.reshape(b, views, -1).astype(jnp.float32), axis=1)


class MixtureClassifier(nn.Module):
  """[b, t, h, w, 3] -> logits [b, classes of `head`]: backbone tokens, attention pool, one head.

  backbone: the family's module (unbound); its parameters keep their own top-level names (shared
  scope), so init_from (an ImageNet ViT .npz, another workdir) fills them as for the family.
  heads: ((name, num_classes), ...). Initialisation creates every head.
  """

  backbone: nn.Module
  heads: tuple[tuple[str, int], ...]
  num_heads: int
  mlp_dim: int
  rep_size: int | None = None
  dropout: float = 0.0
  dtype: str = "float32"

  def setup(self):
    self.net = self.backbone.clone()
    nn.share_scope(self, self.net)
    self.pool = layers.AttentionPool(self.num_heads, self.mlp_dim, jnp.dtype(self.dtype))
    self.classifiers = ClassifierHeads(self.heads, self.rep_size, self.dropout, name=HEADS)

  def __call__(self, video_BTHWC, train: bool = False, head: str | None = None):
    tokens_BTLC = self.net.tokens(video_BTHWC, train=train)
    b, t, n, c = tokens_BTLC.shape
    x_BC = self.pool(tokens_BTLC.reshape(b, t * n, c))
    return self.classifiers(x_BC, head or self.heads[0][0], train)


class ClassifierHeads(nn.Module):
  """[b, c] -> logits of one named head (heads/<name>/...); initialisation creates them all."""

  heads: tuple[tuple[str, int], ...]
  rep_size: int | None
  dropout: float

  @nn.compact
  def __call__(self, x_BC, head: str, train: bool):
    out = None
    for name, num_classes in self.heads:
      if name == head or self.is_initializing():
        logits = layers.ClassifierHead(num_classes, self.rep_size, self.dropout, name=name)(
          x_BC, train
        )
        out = logits if name == head else out
    if out is None:
      raise ValueError(f"No head {head!r}; the heads are {[n for n, _ in self.heads]}.")
    return out


class Classification(Task):
  name = "classification"

  def __init__(self, config, family, model_cfg):
    super().__init__(config, family, model_cfg)
    # data.mixture: every member resolved (files read, errors raised) before anything compiles.
    # Subclasses (readout) build their own models, without per-dataset heads: the trainer
    # refuses a mixture for them.
    use_mixture = mixture.entries(config) and type(self) is Classification
    self.members = mixture.members(config) if use_mixture else []
    self.member = self.members[0] if self.members else None
    self._member_view = False  # True for member_task(i)
    if self.members:
      self.fresh_prefixes = (f"{HEADS}/", f"{POOL}/")

  # --- data.mixture

  def member_task(self, index: int) -> Classification:
    """This task reading mixture member `index` (its frames, its head)."""
    task = copy.copy(self)
    task.member = self.members[index]
    task._member_view = True
    return task

  def head_classes(self) -> tuple[tuple[str, int], ...]:
    """(head name, classes) of every head, in order of first use."""
    heads: dict[str, int] = {}
    for m in self.members:
      heads.setdefault(m.head, m.num_classes)
    return tuple(heads.items())

  def _frames(self) -> int:
    return self.member.num_frames if self.member else self.config.data.num_frames

  def config_errors(self, mesh_shape):
    """Each member's frames must suit the model (e.g. a 1-frame image for TRecViT's tubelet)."""
    errors = []
    for i, m in enumerate(self.members):
      image_size = self.config.data.image_size
      for e in self.family.config_errors(self.model_cfg, mesh_shape, m.num_frames, image_size):
        errors.append(f"data.mixture[{i}] ({m.path}, {m.num_frames} frames): {e}")
    return errors

  def build_model(self):
    if not self.members:
      return self.family.build(self.model_cfg)
    cfg = self.model_cfg
    return MixtureClassifier(
      self.family.build(cfg),
      self.head_classes(),
      num_heads=cfg.num_heads,
      mlp_dim=getattr(cfg, "mlp_dim", 4 * cfg.width),
      rep_size=getattr(cfg, "rep_size", None),
      dropout=getattr(cfg, "classifier_dropout", 0.0),
      dtype=getattr(cfg, "dtype", "float32"),
    )

  def data_options(self, train):
    del train
    return dict(num_frames=self.member.num_frames) if self.member else {}

  def batch_spec(self, batch_size, train):
    spec = super().batch_spec(batch_size, train)
    if self.member:
      video = spec["video"]
      shape = list(video.shape)
      shape[1 if train else 2] = self.member.num_frames
      spec["video"] = jax.ShapeDtypeStruct(tuple(shape), video.dtype)
    return spec

  def _head(self) -> dict:
    return dict(head=self.member.head) if self.member else {}

  def train_flops_per_clip(self):
    """The members' FLOPs weighted by their share of the steps (the model's own head's FLOPs
    stand in for the pool and the heads)."""
    if not self.members or self._member_view:
      return 3.0 * self.family.forward_flops(
        self.model_cfg, self._frames(), self.config.data.image_size
      )
    total = sum(m.weight for m in self.members)
    return sum(
      m.weight / total * self.member_task(i).train_flops_per_clip()
      for i, m in enumerate(self.members)
    )

  # --- training and evaluation

  def loss(self, model, params, batch, rng):
    logits = model.apply(
      {"params": params}, batch["video"], train=True, rngs={"dropout": rng}, **self._head()
    )
    num_classes = logits.shape[-1]
    return cross_entropy(logits, batch["label"], num_classes, self.config.label_smoothing), {}

  def eval_sums(self, model, params, batch, rng):
    del rng
    logits = view_averaged_logits(model, params, batch["video"], **self._head())
    return top_k_sums(logits, batch["label"], batch["mask"])


TASK = Classification
