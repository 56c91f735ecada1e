"""Task `readout`: a frozen encoder's features read by a learned attention readout.

ReadoutModel: [b, t, h, w, 3] in [0, 1] -> logits [b, classes]. The family's encoder (its own
parameter names, e.g. TRecViT's tokenizer/ and encoder/) runs under stop_gradient, so its backward
pass is never built; only readout/ trains, and the optimizer (`frozen_encoder_tx`) neither decays
the encoder nor keeps moments for it. A learned query cross-attends to every final-layer token of
every frame (`tokens()` of the family's module). Encoder parameters come from init_from (an MAE
workdir, a supervised workdir, or an .npz the family imports), which is required.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trecvit_dist.models import layers
from trecvit_dist.models.layers import LOGICAL
from trecvit_dist.tasks.classification import Classification

READOUT = "readout"


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
    query = self.param(
      "query", LOGICAL(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, c)
    )
    query_B1C = jnp.broadcast_to(query, (b, 1, c))
    kv = layers.layer_norm(name="norm_tokens")(tokens_BLC.astype(jnp.float32))
    q = layers.HeadsProjection(self.num_heads, head_dim, name="query_proj")(query_B1C)
    k = layers.HeadsProjection(self.num_heads, head_dim, name="key")(kv)
    v = layers.HeadsProjection(self.num_heads, head_dim, name="value")(kv)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
    out_B1HD = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = query_B1C + layers.OutProjection(c, name="out")(out_B1HD)
    y = layers.dense(self.mlp_ratio * c, ("embed", "mlp"), jnp.float32, "mlp_0")(
      layers.layer_norm(name="norm_mlp")(x)
    )
    x = x + layers.dense(c, ("mlp", "embed"), jnp.float32, "mlp_1")(jax.nn.gelu(y))
    x = layers.layer_norm(name="norm")(x)[:, 0]
    return nn.Dense(
      self.num_classes,
      kernel_init=LOGICAL(nn.initializers.zeros_init(), ("embed", "classes")),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("classes",)),
      name="head",
    )(x)


class ReadoutModel(nn.Module):
  """Frozen encoder + AttentionReadout: [b, t, h, w, 3] -> logits [b, num_classes].

  backbone: the family's module (unbound); its parameters keep their own top-level names (shared
  scope), so an encoder trained as a classifier or by MAE loads path by path.
  """

  backbone: nn.Module
  num_classes: int
  readout_heads: int

  def setup(self):
    self.net = self.backbone.clone()
    nn.share_scope(self, self.net)
    self.readout = AttentionReadout(self.num_classes, self.readout_heads)

  def encode(self, video_BTHWC):
    """Frozen features [b, t', L, c]."""
    return jax.lax.stop_gradient(self.net.tokens(video_BTHWC))

  def __call__(self, video_BTHWC, train: bool = False):
    del train  # no dropout in the probe
    encoded = self.encode(video_BTHWC)
    b, t, n, c = encoded.shape
    return self.readout(encoded.reshape(b, t * n, c))


def trainable_labels(params) -> dict[str, str]:
  """optax.multi_transform labels (a prefix tree): "train" for readout/, "frozen" otherwise."""
  return {k: ("train" if k == READOUT else "frozen") for k in params}


def frozen_encoder_tx(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """tx on readout/ only; zero updates and no optimizer state for the frozen encoder."""
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels)


class Readout(Classification):
  """Classification losses and metrics on a frozen encoder (config.readout.num_heads)."""

  name = "readout"
  fresh_prefixes = ("readout/",)

  def config_errors(self, mesh_shape):
    del mesh_shape
    if not self.config.init_from:
      return ["task=readout needs init_from (an MAE workdir or an official .npz)"]
    return []

  def build_model(self):
    heads = self.config.get("readout", {}).get("num_heads") or self.model_cfg.num_heads
    return ReadoutModel(self.family.build(self.model_cfg), self.model_cfg.num_classes, heads)

  def optimizer(self, tx):
    return frozen_encoder_tx(tx)

  def train_flops_per_clip(self):
    """The encoder forward once, plus the readout's key and value projections and attention
    over all tokens, 3x (forward and backward)."""
    d, cfg = self.config.data, self.model_cfg
    grid = self.family.token_grid(cfg, d.num_frames, d.image_size)
    tokens = grid.frames * (grid.prefix + grid.height * grid.width)
    encoder = self.family.forward_flops(cfg, d.num_frames, d.image_size, head=False)
    width = cfg.width
    readout = 2 * 2 * tokens * width * width + 2 * 2 * tokens * width
    return float(encoder + 3 * readout)


TASK = Readout
