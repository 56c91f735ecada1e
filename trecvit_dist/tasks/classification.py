"""Supervised classification: cross-entropy (with label smoothing), top-1 / top-5 over views.

Train batch: video [B, T, H, W, 3], label [B]. Eval batch: video [B, views, T, H, W, 3], label
[B], mask [B]; the logits are averaged over the views (temporal clips x spatial crops) before the
top-k. The model is the family's classifier as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from trecvit_dist.tasks.task import Task, flatten_views


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


def view_averaged_logits(model, params, video):
  """Logits [B, classes] in float32, averaged over the views of [B, views, T, H, W, 3]."""
  b = video.shape[0]
  flat, views = flatten_views(video)
  logits = model.apply({"params": params}, flat)
  return jnp.mean(logits.reshape(b, views, -1).astype(jnp.float32), axis=1)


class Classification(Task):
  name = "classification"

  def loss(self, model, params, batch, rng):
    logits = model.apply({"params": params}, batch["video"], train=True, rngs={"dropout": rng})
    num_classes = self.model_cfg.num_classes
    return cross_entropy(logits, batch["label"], num_classes, self.config.label_smoothing), {}

  def eval_sums(self, model, params, batch, rng):
    del rng
    logits = view_averaged_logits(model, params, batch["video"])
    return top_k_sums(logits, batch["label"], batch["mask"])


TASK = Classification
