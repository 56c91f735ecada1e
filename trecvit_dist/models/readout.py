"""Frozen-feature readout: a learned query cross-attends to all encoder tokens of all frames.

ReadoutModel: [b, t, h, w, 3] in [0, 1] -> logits [b, classes]. The TRecViT encoder (tokenizer/,
encoder/, TRecViT's names) runs under stop_gradient, so its backward pass is never built; only
readout/ trains. Pair it with `frozen_encoder_tx` so AdamW neither decays the encoder nor keeps
moments for it. Encoder parameters come from an MAE workdir or an official .npz
(`load_encoder_params`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trecvit_dist.models.config import TRecViTConfig
from trecvit_dist.models.trecvit import (
  LOGICAL,
  Encoder,
  HeadsProjection,
  OutProjection,
  Tokenizer,
  _dense,
  check_video,
)

ENCODER_PREFIXES = ("tokenizer/", "encoder/")


class AttentionReadout(nn.Module):
  """Attentive probe: tokens [b, L, c] -> logits [b, classes].

  query [1, 1, c] attends (num_heads heads) to LayerNorm(tokens); residual MLP; LayerNorm; a
  zero-initialised linear head (so training starts at uniform predictions).
  """

  num_classes: int
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens_BLC):
    b, _, c = tokens_BLC.shape
    if c % self.num_heads:
      raise ValueError(f"readout: width {c} is not divisible by {self.num_heads} heads.")
    head_dim = c // self.num_heads
    ln = functools.partial(
      nn.LayerNorm,
      epsilon=1e-6,
      scale_init=LOGICAL(nn.initializers.ones_init(), ("embed",)),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
    )
    query = self.param(
      "query", LOGICAL(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, c)
    )
    query_B1C = jnp.broadcast_to(query, (b, 1, c))
    kv = ln(name="norm_tokens")(tokens_BLC.astype(jnp.float32))
    q = HeadsProjection(self.num_heads, head_dim, name="query_proj")(query_B1C)
    k = HeadsProjection(self.num_heads, head_dim, name="key")(kv)
    v = HeadsProjection(self.num_heads, head_dim, name="value")(kv)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
    out_B1HD = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = query_B1C + OutProjection(c, name="out")(out_B1HD)
    y = _dense(self.mlp_ratio * c, ("embed", "mlp"), jnp.float32, "mlp_0")(ln(name="norm_mlp")(x))
    x = x + _dense(c, ("mlp", "embed"), jnp.float32, "mlp_1")(jax.nn.gelu(y))
    x = ln(name="norm")(x)[:, 0]
    return nn.Dense(
      self.num_classes,
      kernel_init=LOGICAL(nn.initializers.zeros_init(), ("embed", "classes")),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("classes",)),
      name="head",
    )(x)


class ReadoutModel(nn.Module):
  """Frozen TRecViT encoder + AttentionReadout: [b, t, h, w, 3] -> logits [b, cfg.num_classes].

  A drop-in for TRecViT in train.make_train_step / make_eval_step (same call signature).
  readout_heads None: the encoder's num_heads.
  """

  cfg: TRecViTConfig
  readout_heads: int | None = None

  def setup(self):
    self.tokenizer = Tokenizer(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.readout = AttentionReadout(self.cfg.num_classes, self.readout_heads or self.cfg.num_heads)

  def encode(self, video_BTHWC):
    """Frozen features [b, t', n (+1), c]."""
    check_video(self.cfg, video_BTHWC.shape)
    x = self.tokenizer(video_BTHWC)
    x = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
    encoded, _ = self.encoder(x)
    return jax.lax.stop_gradient(encoded)

  def __call__(self, video_BTHWC, train: bool = False):
    del train  # no dropout in the probe
    encoded = self.encode(video_BTHWC)
    b, t, n, c = encoded.shape
    return self.readout(encoded.reshape(b, t * n, c))


def trainable_labels(params) -> dict[str, str]:
  """optax.multi_transform labels (a prefix tree): "train" for readout/, "frozen" otherwise."""
  return {k: ("train" if k == "readout" else "frozen") for k in params}


def frozen_encoder_tx(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """tx on readout/ only; zero updates and no optimizer state for the frozen encoder."""
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels)


def load_encoder_params(
  flat: Mapping[str, np.ndarray], cfg: TRecViTConfig, image_size: tuple[int, int]
) -> tuple[dict, list[str]]:
  """({"tokenizer": ..., "encoder": ...}, ignored keys) from a flat official-layout dict.

  Keys outside tokenizer/ and encoder/ (a classifier's or an MAE release's decoder/, our
  mae_decoder/) are ignored and listed; tokenizer/ and encoder/ must match cfg exactly (missing,
  unexpected or mis-shaped keys raise official.import_params' ValueError).
  """
  from trecvit_dist import official  # noqa: PLC0415 (official imports the models package)

  ignored = sorted(k for k in flat if not k.startswith(ENCODER_PREFIXES))
  params = official.import_params(
    flat,
    cfg,
    image_size,
    ignore_prefixes=tuple(ignored),
    allow_missing_prefixes=("decoder/",),
  )
  return {k: params[k] for k in ("tokenizer", "encoder")}, ignored
