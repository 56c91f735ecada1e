"""ViViT's factorised encoder (model.name=vivit_factorised) in Flax linen.

video [b, t, h, w, 3] in [0, 1] -> tubelets of model.patch_size (default (2, 16, 16)) ->
[b, t', n, c] -> SpatialTransformer over the n tokens of each time slot (its own CLS and spatial
position embedding [1, 1 + n, c]) -> the slots' CLS outputs [b, t', c] -> TemporalTransformer (its
own CLS and temporal position embedding [1, 1 + t', c]) -> classifier on its CLS. B: 12 spatial +
4 temporal layers (FACTORISED_VARIANTS). The building blocks, checks and the ImageNet-ViT mapping
are vivit.py's; from an image ViT the SpatialTransformer is the ViT itself, run per time slot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from trecvit_dist.models import layers
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.vivit import (
  VARIANTS,
  ClsTransformer,
  ViViTConfig,
  check_video,
  classifier_head,
  config_errors,
  finalize_num_frames,
  finish_import,
  grid,
  head_flops,
  image_vit_params,
  pool,
  read_image_vit,
  tubelet_embedding,
)

# depth spatial layers and 4 temporal ones, the ViViT paper's factorised encoders (B: 12 + 4).
FACTORISED_VARIANTS = {k: dict(v, temporal_depth=4) for k, v in VARIANTS.items()}


@dataclasses.dataclass(frozen=True)
class ViViTFactorisedConfig(ViViTConfig):
  """ViViTConfig plus the temporal transformer's depth (same width, heads and MLP)."""

  temporal_depth: int = 4


class ViViTFactorised(nn.Module):
  """Spatial ViT per time slot, temporal ViT over the slots: [b, t, h, w, 3] -> logits."""

  cfg: ViViTFactorisedConfig

  def setup(self):
    self.head = classifier_head(self.cfg)

  @nn.compact
  def encode(self, video_BTHWC):
    """(spatial tokens [b, t', (1 +) n, c], temporal tokens [b, (1 +) t', c])."""
    cfg = self.cfg
    check_video(cfg, video_BTHWC.shape)
    dtype = jnp.dtype(cfg.dtype)
    x = tubelet_embedding(cfg)(video_BTHWC.astype(dtype))
    b = x.shape[0]
    x = einops.rearrange(x, "b t gh gw c -> (b t) (gh gw) c")
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_embed"))
    encoder = dict(num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, use_cls=cfg.use_cls, dtype=dtype)
    spatial = ClsTransformer(cfg.depth, **encoder, remat=cfg.remat, name="SpatialTransformer")(x)
    spatial = einops.rearrange(spatial, "(b t) n c -> b t n c", b=b)
    slots_BTC = spatial[:, :, 0] if cfg.use_cls else jnp.mean(spatial, axis=2)
    slots_BTC = nn.with_logical_constraint(slots_BTC, ("act_batch", None, "act_embed"))
    temporal = ClsTransformer(
      cfg.temporal_depth, **encoder, remat=cfg.remat, name="TemporalTransformer"
    )(slots_BTC)
    return spatial, temporal

  def tokens(self, video_BTHWC, train: bool = False):
    """[b, t', 1 + n, c]: per slot its temporal-transformer output, then its n spatial tokens."""
    del train
    spatial, temporal = self.encode(video_BTHWC)
    cls = int(self.cfg.use_cls)
    return jnp.concatenate([temporal[:, cls:, None], spatial[:, :, cls:]], axis=2)

  def __call__(self, video_BTHWC, train: bool = False):
    _, temporal = self.encode(video_BTHWC)
    return self.head(pool(temporal, self.cfg.use_cls), train)


def forward_flops(
  cfg: ViViTFactorisedConfig, num_frames: int, image_size: int, head: bool = True
) -> float:
  """Analytic forward FLOPs of one clip (2 per multiply-add; matmuls and attention)."""
  t, n, patch_dim = grid(cfg, num_frames, image_size)
  cls, block = int(cfg.use_cls), layers.vit_block_flops
  spatial = t * cfg.depth * (cls + n) * block(cfg.width, cfg.mlp_dim, cls + n)
  temporal = cfg.temporal_depth * (cls + t) * block(cfg.width, cfg.mlp_dim, cls + t)
  patch = 2 * t * n * patch_dim * cfg.width
  return float(patch + spatial + temporal + (head_flops(cfg) if head else 0))


def token_grid(cfg: ViViTFactorisedConfig, num_frames: int, image_size: int) -> TokenGrid:
  pt, ph, pw = cfg.patch_size
  return TokenGrid(num_frames // pt, 1, image_size // ph, image_size // pw)


def import_npz(
  flat: Mapping[str, np.ndarray], cfg: ViViTFactorisedConfig, image_size: int, with_head
):
  """An ImageNet ViT .npz -> (flat params, notes, keys left fresh): the tubelet embedding and the
  SpatialTransformer (the ViT, per time slot); the TemporalTransformer and classifier are fresh."""
  del with_head  # an image classifier never fits the video classes
  vit = read_image_vit(flat, "vivit_factorised")
  params, how = image_vit_params(
    vit, cfg, image_size, prefix="SpatialTransformer/", depth=cfg.depth, slots=1
  )
  return finish_import(vit, params, how, ViViTFactorised(cfg), cfg, image_size)


FAMILY = ModelFamily(
  name="vivit_factorised",
  config_class=ViViTFactorisedConfig,
  variants=FACTORISED_VARIANTS,
  build=ViViTFactorised,
  config_errors=config_errors,
  forward_flops=forward_flops,
  token_grid=token_grid,
  finalize=finalize_num_frames,
  import_npz=import_npz,
  causal=False,
)
