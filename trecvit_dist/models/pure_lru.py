"""PureLRU, the TRecViT paper's attention-free baseline (model.name=pure_lru), in Flax linen.

video [b, t, h, w, 3] in [0, 1] -> (1, 16, 16) patches [b, t, n, c] + learned spatial [n, c] and
temporal [t, c] position embeddings -> flattened frame after frame into one sequence
[b, t n, c] -> depth residual blocks, each x + RecurrentBlock(RMSNorm(x)) (the Griffin gated-LRU
block of layers.py: the Pallas kernel, run with the clips as its batch rows and t n steps, sharded
through sharding.gated_lru) then x + Mlp(LayerNorm(x)) -> LayerNorm -> classifier. No attention.

The model is causal along the sequence, hence over frames: the tokens of frame t see frames <= t
only. The paper prepends a class token as ViViT does, but the first position of a causal model
sees nothing, so the class is read from the LAST position, the one token that has seen the whole
clip (pooling="last", the default); pooling="gap" averages every token's output instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import einops
import flax.linen as nn
import jax.numpy as jnp

from trecvit_dist.models import layers
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.layers import LOGICAL

# width, depth, mlp_dim, num_heads (= the gates' blocks): the ViT sizes, as TRecViT's.
VARIANTS: dict[str, dict[str, int]] = {
  "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
  "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
  "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
  "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class PureLRUConfig:
  """Hyper-parameters of PureLRU; the gated-LRU settings default to TRecViT's."""

  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12  # blocks of the LRU's block-diagonal gates (there is no attention)
  patch_size: tuple[int, int, int] = (1, 16, 16)
  num_frames: int = 32  # clip length the temporal position embedding covers (data.num_frames)
  num_classes: int = 400
  rep_size: int | None = None  # pre-logits Dense + tanh; None drops it
  pooling: str = "last"  # "last": the last position's output; "gap": mean over all tokens
  classifier_dropout: float = 0.0
  conv1d_temporal_width: int = 4
  state_multiplier: int = 2  # lru_width = state_multiplier * width
  min_rad: float = 0.5
  max_rad: float = 0.999
  lru_c: float = 8.0
  lru_impl: str = "auto"  # kernels.gated_lru impl: "auto", "pallas", "xla", "associative"
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # "none", "full", "dots_saveable" (rematerialise each block)

  def __post_init__(self):
    errors = []
    if len(tuple(self.patch_size)) != 3:
      errors.append(f"patch_size must be (t, h, w), got {self.patch_size}")
    if self.lru_width % self.num_heads:
      errors.append(f"lru width {self.lru_width} is not divisible by {self.num_heads} gate heads")
    if self.pooling not in ("last", "gap"):
      errors.append(f"pooling must be 'last' or 'gap', got {self.pooling!r}")
    if self.remat not in layers.REMAT_POLICIES:
      errors.append(f"remat must be one of {layers.REMAT_POLICIES}, got {self.remat!r}")
    if self.lru_impl not in ("auto", "pallas", "xla", "associative"):
      errors.append(f"lru_impl must be auto/pallas/xla/associative, got {self.lru_impl!r}")
    if not 0.0 < self.min_rad < self.max_rad < 1.0:
      errors.append(f"need 0 < min_rad < max_rad < 1, got {self.min_rad}, {self.max_rad}")
    if errors:
      raise ValueError("Invalid PureLRU config: " + "; ".join(errors) + ".")
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

  @property
  def lru_width(self) -> int:
    return self.state_multiplier * self.width

  @property
  def lru(self) -> layers.LRUSettings:
    return layers.LRUSettings(
      lru_width=self.lru_width,
      gate_heads=self.num_heads,
      conv1d_temporal_width=self.conv1d_temporal_width,
      min_rad=self.min_rad,
      max_rad=self.max_rad,
      c=self.lru_c,
      impl=self.lru_impl,
      dtype=self.dtype,
    )


class PureLRUBlock(nn.Module):
  """x + RecurrentBlock(RMSNorm(x)), then x + Mlp(LayerNorm(x)), along x_BLC's L axis."""

  cfg: PureLRUConfig

  @nn.compact
  def __call__(self, x_BLC):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    x_BLC = nn.with_logical_constraint(x_BLC, ("act_batch", None, "act_embed"))
    y = layers.RMSNorm(name="temporal_pre_norm")(x_BLC)
    y, _ = layers.RecurrentBlock(cfg.lru, name="recurrent_block")(y)
    x_BLC = x_BLC + y
    y = layers.Mlp(cfg.mlp_dim, dtype, name="MlpBlock_0")(
      layers.layer_norm(dtype, "LayerNorm_1")(x_BLC)
    )
    return x_BLC + y


def check_video(cfg: PureLRUConfig, shape) -> None:
  """Raises a ValueError naming the problem when a video's shape does not fit the model."""
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"video must be [batch, time, height, width, 3], got {tuple(shape)}.")
  _, t, h, w, _ = shape
  pt, ph, pw = cfg.patch_size
  if t % pt or h % ph or w % pw:
    raise ValueError(f"video {t}x{h}x{w} does not divide into patches of {cfg.patch_size}.")
  if t != cfg.num_frames:
    raise ValueError(
      f"a {t}-frame video, but the temporal position embedding covers model.num_frames="
      f"{cfg.num_frames} frames (data.num_frames sets it)."
    )


class PureLRU(nn.Module):
  """[b, t, h, w, 3] in [0, 1] -> logits [b, classes], attention-free and causal."""

  cfg: PureLRUConfig

  def setup(self):
    cfg = self.cfg
    self.head = layers.ClassifierHead(cfg.num_classes, cfg.rep_size, cfg.classifier_dropout)

  @nn.compact
  def encode(self, video_BTHWC):
    """Final-layer tokens [b, t' n, c], frame after frame."""
    cfg = self.cfg
    check_video(cfg, video_BTHWC.shape)
    dtype = jnp.dtype(cfg.dtype)
    x = nn.Conv(
      cfg.width,
      kernel_size=cfg.patch_size,
      strides=cfg.patch_size,
      padding="VALID",
      dtype=dtype,
      kernel_init=LOGICAL(nn.initializers.lecun_normal(), (None, None, None, None, "embed")),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
      name="embedding",
    )(video_BTHWC.astype(dtype))
    _, t, gh, gw, c = x.shape
    posemb = LOGICAL(nn.initializers.normal(0.02), (None, "embed"))
    spatial_NC = self.param("spatial_pos_embedding", posemb, (gh * gw, c))
    temporal_TC = self.param("temporal_pos_embedding", posemb, (t, c))
    x = einops.rearrange(x, "b t gh gw c -> b t (gh gw) c")
    x = x + (temporal_TC[:, None] + spatial_NC[None]).astype(dtype)[None]
    x = einops.rearrange(x, "b t n c -> b (t n) c")
    block = layers.remat(PureLRUBlock, cfg.remat)
    for i in range(cfg.depth):
      x = block(cfg, name=f"block_{i:02d}")(x)
    return layers.layer_norm(dtype, "encoder_norm")(x)

  def tokens(self, video_BTHWC, train: bool = False):
    """Final-layer tokens [b, t', n, c]."""
    del train
    t = video_BTHWC.shape[1] // self.cfg.patch_size[0]
    return einops.rearrange(self.encode(video_BTHWC), "b (t n) c -> b t n c", t=t)

  def __call__(self, video_BTHWC, train: bool = False):
    x = self.encode(video_BTHWC)
    pooled = x[:, -1] if self.cfg.pooling == "last" else jnp.mean(x, axis=1)
    return self.head(pooled, train)


def forward_flops(cfg: PureLRUConfig, num_frames: int, image_size: int, head: bool = True) -> float:
  """Analytic forward FLOPs of one clip (2 per multiply-add; matmuls and the depthwise conv; the
  scan and other element-wise work are left out, as for TRecViT)."""
  pt, ph, pw = cfg.patch_size
  tokens = (num_frames // pt) * (image_size // ph) * (image_size // pw)
  patch = 2 * tokens * pt * ph * pw * 3 * cfg.width
  per_token = layers.recurrent_block_flops(cfg.width, cfg.lru) + 2 * 2 * cfg.width * cfg.mlp_dim
  rep = cfg.rep_size or 0
  classifier = 2 * cfg.width * rep + 2 * (rep or cfg.width) * cfg.num_classes
  return float(patch + cfg.depth * tokens * per_token + (classifier if head else 0))


def config_errors(cfg: PureLRUConfig, mesh_shape: Mapping[str, int], num_frames, image_size):
  """Sizes that do not split over the mesh, patches that do not tile the clip."""
  errors = []
  tensor = mesh_shape.get("tensor", 1)
  for what, size in (
    ("mlp_dim", cfg.mlp_dim),
    ("lru width", cfg.lru_width),
    ("gate heads (num_heads)", cfg.num_heads),
  ):
    if size % tensor:
      errors.append(f"{what} {size} is not divisible by mesh.tensor={tensor}")
  if cfg.width % mesh_shape.get("fsdp", 1):
    errors.append(f"width {cfg.width} is not divisible by mesh.fsdp={mesh_shape['fsdp']}")
  pt, ph, pw = cfg.patch_size
  if num_frames % pt or image_size % ph or image_size % pw:
    errors.append(
      f"data.num_frames {num_frames} / data.image_size {image_size} do not divide by the patch "
      f"size {cfg.patch_size}"
    )
  return errors


def _finalize(values: dict, *, fields, num_frames: int, image_size: int) -> dict:
  del fields, image_size
  values["num_frames"] = num_frames
  return values


def token_grid(cfg: PureLRUConfig, num_frames: int, image_size: int) -> TokenGrid:
  pt, ph, pw = cfg.patch_size
  return TokenGrid(num_frames // pt, 0, image_size // ph, image_size // pw)


FAMILY = ModelFamily(
  name="pure_lru",
  config_class=PureLRUConfig,
  variants=VARIANTS,
  build=PureLRU,
  config_errors=config_errors,
  forward_flops=forward_flops,
  token_grid=token_grid,
  finalize=_finalize,
  causal=True,
)
