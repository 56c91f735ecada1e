"""ViViT (Arnab et al., 2021) with full spatio-temporal attention (model.name=vivit), in Flax linen.

video [b, t, h, w, 3] in [0, 1] -> tubelets of model.patch_size (pt, ph, pw) (default (2, 16, 16);
(1, 16, 16) gives one token per patch per frame) -> tokens [b, t' n, c], time-major -> a CLS first
-> + a learned spatio-temporal position embedding [1, 1 + t' n, c] -> depth pre-LN ViT blocks over
all 1 + t' n tokens -> LayerNorm -> classifier on the CLS. `pooling="gap"` drops the CLS and
averages all tokens instead (scenic's "gap").

Parameter names follow the public ViT layout (embedding/, Transformer/{cls, pos_embedding,
encoderblock_{i} with layers.vit_block's names, encoder_norm}, the classifier under head/), so an
ImageNet ViT maps onto them (`import_npz`: the patch kernel on the tubelet's central frame, the
position grid tiled over time). The model is not causal: every output depends on every frame. The
position embedding is learned for model.num_frames frames (set from data.num_frames), the clip
length it runs on. The factorised encoder (vivit_factorised.py) is built from the same pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trecvit_dist.models import layers, vit_checkpoint
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.layers import LOGICAL

# width, depth, mlp_dim, num_heads: the ViT sizes (ViViT-B: 768, 12, 3072, 12; L: 1024, 24, ...).
VARIANTS: dict[str, dict[str, int]] = {
  "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
  "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
  "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
  "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class ViViTConfig:
  """Hyper-parameters of ViViT; defaults are ViViT-B with 2x16x16 tubelets, 32 frames, K400."""

  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: tuple[int, int, int] = (2, 16, 16)  # (frames, height, width) of a tubelet
  num_frames: int = 32  # clip length the position embedding covers (set from data.num_frames)
  num_classes: int = 400
  rep_size: int | None = None  # pre-logits Dense + tanh; None (ViViT's default) drops it
  pooling: str = "cls"  # "cls": classifier on the class token; "gap": no class token, mean
  classifier_dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # "none", "full", "dots_saveable" (rematerialise each block)

  def __post_init__(self):
    errors = []
    if self.width % self.num_heads:
      errors.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if len(tuple(self.patch_size)) != 3:
      errors.append(f"patch_size must be (t, h, w), got {self.patch_size}")
    if self.pooling not in ("cls", "gap"):
      errors.append(f"pooling must be 'cls' or 'gap', got {self.pooling!r}")
    if self.remat not in layers.REMAT_POLICIES:
      errors.append(f"remat must be one of {layers.REMAT_POLICIES}, got {self.remat!r}")
    if errors:
      raise ValueError(f"Invalid {type(self).__name__}: " + "; ".join(errors) + ".")
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

  @property
  def use_cls(self) -> bool:
    return self.pooling == "cls"

  def replace(self, **kwargs):
    return dataclasses.replace(self, **kwargs)


# ----------------------------------------------------------------------------- modules


class ClsTransformer(nn.Module):
  """Tokens [b, n, c] -> [b, (1 +) n, c]: a learned CLS first (use_cls), a learned position
  embedding over every position, depth pre-LN ViT blocks, LayerNorm (public ViT names: cls,
  pos_embedding, encoderblock_{i}, encoder_norm)."""

  depth: int
  num_heads: int
  mlp_dim: int
  use_cls: bool = True
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x_BNC):
    b, _, c = x_BNC.shape
    if self.use_cls:
      cls = self.param(
        "cls", LOGICAL(nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, c)
      )
      x_BNC = jnp.concatenate([jnp.broadcast_to(cls.astype(x_BNC.dtype), (b, 1, c)), x_BNC], 1)
    pos = self.param(
      "pos_embedding",
      LOGICAL(nn.initializers.normal(0.02), (None, None, "embed")),
      (1, x_BNC.shape[1], c),
    )
    x_BNC = x_BNC + pos.astype(x_BNC.dtype)
    block = layers.remat(layers.ViTBlock, self.remat)
    for i in range(self.depth):
      x_BNC = block(self.num_heads, self.mlp_dim, self.dtype, name=f"encoderblock_{i}")(x_BNC)
    return layers.layer_norm(self.dtype, "encoder_norm")(x_BNC)


def tubelet_embedding(cfg: ViViTConfig) -> nn.Conv:
  """Non-overlapping (pt, ph, pw) tubelets -> width: [b, t, h, w, 3] -> [b, t', gh, gw, c]."""
  return nn.Conv(
    cfg.width,
    kernel_size=cfg.patch_size,
    strides=cfg.patch_size,
    padding="VALID",
    dtype=jnp.dtype(cfg.dtype),
    kernel_init=LOGICAL(nn.initializers.lecun_normal(), (None, None, None, None, "embed")),
    bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
    name="embedding",
  )


def check_video(cfg: ViViTConfig, shape) -> None:
  """Raises a ValueError naming the problem when a video's shape does not fit the model."""
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"video must be [batch, time, height, width, 3], got {tuple(shape)}.")
  _, t, h, w, _ = shape
  pt, ph, pw = cfg.patch_size
  if t % pt:
    raise ValueError(
      f"{t} frames are not divisible by the tubelet's {pt} frames "
      f"(model.patch_size {cfg.patch_size})."
    )
  if h % ph or w % pw:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}.")
  if t != cfg.num_frames:
    raise ValueError(
      f"a {t}-frame video, but the learned position embedding covers model.num_frames="
      f"{cfg.num_frames} frames (data.num_frames sets it)."
    )


def classifier_head(cfg: ViViTConfig) -> layers.ClassifierHead:
  """The classifier under head/: optional pre-logits + tanh, dropout, zero-initialised Dense."""
  return layers.ClassifierHead(cfg.num_classes, cfg.rep_size, cfg.classifier_dropout)


def pool(x_BNC, use_cls: bool):
  """The class token's output, or the mean of all tokens."""
  return x_BNC[:, 0] if use_cls else jnp.mean(x_BNC, axis=1)


class ViViT(nn.Module):
  """Full spatio-temporal attention: [b, t, h, w, 3] in [0, 1] -> logits [b, classes]."""

  cfg: ViViTConfig

  def setup(self):
    self.head = classifier_head(self.cfg)

  @nn.compact
  def encode(self, video_BTHWC):
    """Final-layer tokens [b, (1 +) t' n, c], the CLS first, then time-major tubelets."""
    cfg = self.cfg
    check_video(cfg, video_BTHWC.shape)
    x = tubelet_embedding(cfg)(video_BTHWC.astype(jnp.dtype(cfg.dtype)))
    x = einops.rearrange(x, "b t gh gw c -> b (t gh gw) c")
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_embed"))
    return ClsTransformer(
      cfg.depth,
      cfg.num_heads,
      cfg.mlp_dim,
      cfg.use_cls,
      jnp.dtype(cfg.dtype),
      cfg.remat,
      name="Transformer",
    )(x)

  def tokens(self, video_BTHWC, train: bool = False):
    """The tubelets' final tokens [b, t', n, c] (the CLS left out)."""
    del train
    t = video_BTHWC.shape[1] // self.cfg.patch_size[0]
    encoded = self.encode(video_BTHWC)[:, int(self.cfg.use_cls) :]
    return einops.rearrange(encoded, "b (t n) c -> b t n c", t=t)

  def __call__(self, video_BTHWC, train: bool = False):
    return self.head(pool(self.encode(video_BTHWC), self.cfg.use_cls), train)


# ----------------------------------------------------------------------------- FLOPs


def grid(cfg: ViViTConfig, num_frames: int, image_size: int) -> tuple[int, int, int]:
  """(time slots t', tubelets per slot n, pixels per tubelet pt * ph * pw * 3)."""
  pt, ph, pw = cfg.patch_size
  return num_frames // pt, (image_size // ph) * (image_size // pw), pt * ph * pw * 3


def head_flops(cfg: ViViTConfig) -> float:
  """Forward FLOPs of the classifier on one clip."""
  rep = cfg.rep_size or 0
  return 2.0 * cfg.width * rep + 2.0 * (rep or cfg.width) * cfg.num_classes


def forward_flops(cfg: ViViTConfig, num_frames: int, image_size: int, head: bool = True) -> float:
  """Analytic forward FLOPs of one clip through ViViT (2 per multiply-add; matmuls, attention)."""
  t, n, patch_dim = grid(cfg, num_frames, image_size)
  tokens = int(cfg.use_cls) + t * n
  blocks = cfg.depth * tokens * layers.vit_block_flops(cfg.width, cfg.mlp_dim, tokens)
  return float(2 * t * n * patch_dim * cfg.width + blocks + (head_flops(cfg) if head else 0))


# ----------------------------------------------------------------------------- checks


def config_errors(cfg: ViViTConfig, mesh_shape: Mapping[str, int], num_frames, image_size):
  """Sizes that do not split over the mesh, tubelets that do not tile the clip."""
  errors = layers.vit_mesh_errors(cfg.width, cfg.num_heads, cfg.mlp_dim, mesh_shape)
  errors += layers.tubelet_errors(cfg.patch_size, num_frames, image_size)
  return errors


def finalize_num_frames(values: dict, *, fields, num_frames: int, image_size: int) -> dict:
  """model.num_frames is data.num_frames: the clip length the position embedding covers."""
  del fields, image_size
  values["num_frames"] = num_frames
  return values


def token_grid(cfg: ViViTConfig, num_frames: int, image_size: int) -> TokenGrid:
  _, ph, pw = cfg.patch_size
  return TokenGrid(num_frames // cfg.patch_size[0], 0, image_size // ph, image_size // pw)


# ----------------------------------------------------------------------------- ImageNet ViT


def expected_shapes(module: nn.Module, cfg: ViViTConfig, image_size: int) -> dict[str, tuple]:
  """Flat {"a/b": shape} of the module's parameters for cfg's clip length and this image size."""
  video = jax.ShapeDtypeStruct((1, cfg.num_frames, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), video)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def image_vit_params(
  vit: vit_checkpoint.ImageViT,
  cfg: ViViTConfig,
  image_size: int,
  *,
  prefix: str,
  depth: int,
  slots: int,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tubelet embedding and one ClsTransformer (under prefix) from an image ViT: (flat params,
  {key: how it was adapted}); the other keys load as they are.

  The patch kernel goes on the tubelet's central frame (zero on the others); the position
  embedding is [the CLS's position, the patch grid resized to this image size and tiled over
  `slots` time slots]. The CLS's position is the ViT's own, or zero for a ViT that adds none to its
  CLS (big_vision). A static video then gives exactly the image model's tokens in every slot when
  the encoder has no CLS or runs on one slot (attending to t' copies of the image's tokens is
  attending to the image); with a CLS and t' > 1 slots, the one CLS gets 1/t' of the attention it
  gets in the image, so the outputs differ from the image model's (see tests/.../test_vit_init.py).
  """
  vit.check_fits(
    "ViViT",
    width=cfg.width,
    depth=depth,
    num_heads=cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
    patch_hw=cfg.patch_size[1:],
  )
  pt, ph, pw = cfg.patch_size
  spatial_grid = (image_size // ph, image_size // pw)
  params = {
    "embedding/kernel": vit_checkpoint.central_frame_kernel(vit.patch_kernel, pt),
    "embedding/bias": vit.patch_bias,
    **vit.block_params(prefix),
    **vit.encoder_norm_params(prefix),
  }
  how = {"embedding/kernel": f"2D patch kernel on frame {pt // 2} of the {pt}-frame tubelet"}
  pos = [np.tile(vit.resized_grid(spatial_grid), (slots, 1))]
  changes = []
  if spatial_grid != vit.grid:
    changes.append(f"{vit.grid} grid resized bilinearly to {spatial_grid}")
  if slots > 1:
    changes.append(f"tiled over {slots} time slots")
  if cfg.use_cls:
    if vit.cls is not None:
      params[f"{prefix}cls"] = vit.cls.reshape(1, 1, -1)
    if vit.cls_pos is None:
      changes.append("zero position for the CLS (the ViT adds none to its CLS)")
    cls_pos = vit.cls_pos if vit.cls_pos is not None else np.zeros((cfg.width,), np.float32)
    pos.insert(0, cls_pos[None])
  params[f"{prefix}pos_embedding"] = np.concatenate(pos)[None]
  if changes:
    how[f"{prefix}pos_embedding"] = "; ".join(changes)
  return params, how


def finish_import(
  vit: vit_checkpoint.ImageViT,
  params: dict[str, np.ndarray],
  how: dict[str, str],
  module: nn.Module,
  cfg: ViViTConfig,
  image_size: int,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(params, notes, keys left fresh) for init_from, after checking every shape against the
  module's parameters."""
  expected = expected_shapes(module, cfg, image_size)
  misshaped = [
    f"{k}: {tuple(v.shape)} vs {expected.get(k)}"
    for k, v in params.items()
    if tuple(v.shape) != expected.get(k)
  ]
  if misshaped:
    raise ValueError(f"init_from: the ImageNet ViT maps to mis-shaped keys: {misshaped}.")
  fresh = sorted(k for k in expected if k not in params)
  loaded = [k for k in params if k not in how]
  notes = vit_checkpoint.import_notes(vit, loaded, how, fresh)
  if vit.cls is not None and not any(k.endswith("/cls") for k in params):
    notes.append("the ViT's CLS is unused (model.pooling='gap' has no class token)")
  return params, notes, fresh


def read_image_vit(flat: Mapping[str, np.ndarray], model: str) -> vit_checkpoint.ImageViT:
  if not vit_checkpoint.is_image_vit(flat):
    raise ValueError(
      f"init_from: model {model} loads only ImageNet ViT .npz files (vision_transformer or "
      "big_vision layout); to start from another run of this model, give its workdir."
    )
  return vit_checkpoint.read(flat)


def import_npz(flat: Mapping[str, np.ndarray], cfg: ViViTConfig, image_size: int, with_head):
  """An ImageNet ViT .npz -> (flat params, notes, keys left fresh) for init_from: blocks and
  encoder_norm as they are, the patch kernel on the tubelet's central frame, the CLS, the
  position grid tiled over time (`image_vit_params`); the classifier starts fresh."""
  del with_head  # an image classifier never fits the video classes
  vit = read_image_vit(flat, "vivit")
  slots = cfg.num_frames // cfg.patch_size[0]
  params, how = image_vit_params(
    vit, cfg, image_size, prefix="Transformer/", depth=cfg.depth, slots=slots
  )
  return finish_import(vit, params, how, ViViT(cfg), cfg, image_size)


FAMILY = ModelFamily(
  name="vivit",
  config_class=ViViTConfig,
  variants=VARIANTS,
  build=ViViT,
  config_errors=config_errors,
  forward_flops=forward_flops,
  token_grid=token_grid,
  finalize=finalize_num_frames,
  import_npz=import_npz,
  causal=False,
)
