"""TubeViT (Piergiovanni et al., 2023): sparse video tubes into one image ViT (model.name=tubevit).

video [b, t, h, w, 3] in [0, 1] (an image is a one-frame clip [b, 1, h, w, 3]) -> per tube i, a
3-D convolution with kernel (kt, kh, kw), stride (st, sh, sw), starting at offset (ot, oh, ow),
over whole tubes only ("VALID") -> [b, t_i, h_i, w_i, c] -> flattened (t, h, w row-major) and
concatenated over the tubes: x_BLC, L = sum_i t_i h_i w_i -> + a FIXED 3-D sin-cos position
embedding of each tube's centre in the clip (frame and pixel coordinates, strides and offsets
included; not a parameter) -> depth pre-LN ViT blocks over all L tokens and LayerNorm (public ViT
names: Transformer/encoderblock_{i}, Transformer/encoder_norm) -> attention pooling (a learned
probe, MAPHead_0/) -> classifier (head/).

A tube that does not fit the clip (e.g. an 8-frame tube on an image) produces no tokens and is
skipped, so one model takes images and videos; tubes are not per frame, so `tokens()` is
[b, 1, L, c]. Kernels are either one per tube (tube_kernels="independent": tubes/tube_{i}/kernel)
or one learned kernel (tubes/kernel, the first tube's shape unless base_kernel says otherwise)
resized trilinearly to every tube's shape (tube_kernels="interpolated"); each tube has its own
bias (tubes/tube_{i}/bias). The defaults are the paper's four tubes (Table 12 of its supplement).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trecvit_dist.models import layers, vit_checkpoint
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.layers import LOGICAL

# (kt, kh, kw, st, sh, sw, ot, oh, ow): kernel, stride and offset, in (frames, rows, columns).
Tube = tuple[int, int, int, int, int, int, int, int, int]

# The paper's tubes (supplement, Table 12): 8x8x8 every (16, 32, 32); 16x4x4 every (6, 32, 32)
# from (4, 8, 8); 4x12x12 every (16, 32, 32) from (0, 16, 16); 1x16x16 (the image ViT's patches)
# every (32, 16, 16).
PAPER_TUBES: tuple[Tube, ...] = (
  (8, 8, 8, 16, 32, 32, 0, 0, 0),
  (16, 4, 4, 6, 32, 32, 4, 8, 8),
  (4, 12, 12, 16, 32, 32, 0, 16, 16),
  (1, 16, 16, 32, 16, 16, 0, 0, 0),
)

# The ViT sizes (supplement, Table 11). ViT-L's 1024 channels are not a multiple of 6: as in the
# paper's formula (6 channels per frequency, d // 6 frequencies), its last 4 carry no position.
VARIANTS: dict[str, dict[str, Any]] = {
  "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
  "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
  "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, posemb_partial=True),
}

TUBE_KERNELS = ("independent", "interpolated")


@dataclasses.dataclass(frozen=True)
class TubeViTConfig:
  """Hyper-parameters of TubeViT; defaults are TubeViT-B with the paper's four tubes, K400."""

  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  num_classes: int = 400
  tubes: tuple[Tube, ...] = PAPER_TUBES
  tube_kernels: str = "independent"  # "independent" (one per tube) or "interpolated"
  # The one learned kernel's (kt, kh, kw) when interpolated; None: the first tube's.
  base_kernel: tuple[int, int, int] | None = None
  # False: width must be a multiple of 6 (2 channels per frequency for each of t, y, x). True:
  # the width % 6 leftover channels carry no position (needed for ViT-L's 1024).
  posemb_partial: bool = False
  rep_size: int | None = None  # pre-logits Dense + tanh before the classifier; None drops it
  classifier_dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # "none", "full", "dots_saveable" (rematerialise each block)

  def __post_init__(self):
    tubes = normalise_tubes(self.tubes)  # raises on a malformed list
    errors = []
    if self.width % self.num_heads:
      errors.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.width % 6 and not self.posemb_partial:
      errors.append(
        f"width {self.width} is not divisible by 6, which the 3-D sin-cos position embedding "
        "needs (a sine and a cosine for each of t, y, x per frequency); use a multiple of 6 "
        "(e.g. 384, 768) or set model.posemb_partial=True to leave the leftover channels "
        "without position"
      )
    if self.width < 6:
      errors.append(f"width {self.width} is below 6, too narrow for the 3-D position embedding")
    if self.tube_kernels not in TUBE_KERNELS:
      errors.append(f"tube_kernels must be one of {TUBE_KERNELS}, got {self.tube_kernels!r}")
    if self.base_kernel is not None and (
      len(tuple(self.base_kernel)) != 3 or min(self.base_kernel) < 1
    ):
      errors.append(f"base_kernel must be 3 positive sizes (kt, kh, kw), got {self.base_kernel}")
    if self.remat not in layers.REMAT_POLICIES:
      errors.append(f"remat must be one of {layers.REMAT_POLICIES}, got {self.remat!r}")
    if errors:
      raise ValueError("Invalid TubeViTConfig: " + "; ".join(errors) + ".")
    object.__setattr__(self, "tubes", tubes)
    if self.base_kernel is not None:
      object.__setattr__(self, "base_kernel", tuple(int(k) for k in self.base_kernel))

  @property
  def interpolated_kernel(self) -> tuple[int, int, int]:
    """(kt, kh, kw) of the one learned kernel of tube_kernels="interpolated"."""
    return self.base_kernel or self.tubes[0][:3]

  def replace(self, **kwargs) -> TubeViTConfig:
    return dataclasses.replace(self, **kwargs)


def normalise_tubes(tubes: Sequence[Sequence[int]]) -> tuple[Tube, ...]:
  """model.tubes as a tuple of 9-int tuples; a ValueError names a malformed entry."""
  out = []
  for i, tube in enumerate(tubes):
    values = tuple(tube)
    ok = len(values) == 9 and all(isinstance(v, int | np.integer) for v in values)
    if not ok or min(values[:6]) < 1 or min(values[6:]) < 0:
      raise ValueError(
        f"model.tubes[{i}] = {values}: each tube is 9 integers (kt, kh, kw, st, sh, sw, ot, oh, "
        "ow): a kernel and a stride of positive sizes and an offset >= 0, in (frames, rows, "
        "columns)."
      )
    out.append(tuple(int(v) for v in values))
  if not out:
    raise ValueError("model.tubes is empty: give at least one tube (e.g. the 1x16x16 patches).")
  return tuple(out)


# ----------------------------------------------------------------------------- tube geometry


def tube_grid(tube: Tube, clip_thw: Sequence[int]) -> tuple[int, int, int]:
  """Tubes along (t, h, w) in a clip of clip_thw: floor((size - offset - kernel) / stride) + 1 when
  the kernel fits after the offset, else 0 (a VALID strided convolution from the offset)."""
  kernel, stride, offset = tube[:3], tube[3:6], tube[6:]
  return tuple(
    (size - o - k) // s + 1 if size - o >= k else 0
    for size, k, s, o in zip(clip_thw, kernel, stride, offset, strict=True)
  )


def num_tokens(cfg: TubeViTConfig, clip_thw: Sequence[int]) -> list[int]:
  """Tokens each tube contributes for a clip of clip_thw (0: the tube is skipped)."""
  return [int(np.prod(tube_grid(tube, clip_thw))) for tube in cfg.tubes]


def tube_centres(tube: Tube, clip_thw: Sequence[int]) -> np.ndarray:
  """[n, 3] (t, y, x) centres of a tube's positions, row-major like its tokens: offset + index *
  stride + (kernel - 1) / 2, in frame and pixel indices (a 1x16x16 patch at 0 is centred at
  (0, 7.5, 7.5))."""
  axes = [
    o + s * np.arange(n, dtype=np.float64) + (k - 1) / 2
    for n, k, s, o in zip(tube_grid(tube, clip_thw), tube[:3], tube[3:6], tube[6:], strict=True)
  ]
  t, y, x = np.meshgrid(*axes, indexing="ij")
  return np.stack([t.reshape(-1), y.reshape(-1), x.reshape(-1)], axis=1)


def sincos_3d(centres_N3: np.ndarray, width: int) -> np.ndarray:
  """Fixed 3-D sin-cos embedding [n, width]: width // 6 frequencies for each of t, y, x, laid out
  [sin t, cos t, sin y, cos y, sin x, cos x] (layers.sincos_1d per axis); channels beyond
  6 * (width // 6) are zero."""
  per_axis = 2 * (width // 6)
  if per_axis == 0:
    raise ValueError(f"the 3-D sin-cos position embedding needs width >= 6, got {width}.")
  parts = [layers.sincos_1d(centres_N3[:, i], per_axis) for i in range(3)]
  pad = np.zeros((centres_N3.shape[0], width - 3 * per_axis), np.float32)
  return np.concatenate(parts + [pad], axis=1)


def position_embedding(cfg: TubeViTConfig, clip_thw: Sequence[int]) -> np.ndarray:
  """[L, width]: sincos_3d of every token's tube centre, tubes concatenated in order."""
  centres = [tube_centres(tube, clip_thw) for tube in cfg.tubes]
  return sincos_3d(np.concatenate(centres, axis=0), cfg.width)


def tube_kernel(base_KKK3C, shape_thw: Sequence[int]):
  """The interpolated kernel's resize to one tube's (kt, kh, kw): trilinear, half-pixel centres,
  no antialiasing (torch's F.interpolate(mode="trilinear"), as in the paper)."""
  shape = (*shape_thw, *base_KKK3C.shape[3:])
  if tuple(base_KKK3C.shape) == shape:
    return base_KKK3C
  return jax.image.resize(base_KKK3C, shape, method="linear", antialias=False)


# ----------------------------------------------------------------------------- modules


KERNEL_INIT = LOGICAL(nn.initializers.lecun_normal(), (None, None, None, None, "embed"))


class TubeParams(nn.Module):
  """One tube's parameters: kernel [kt, kh, kw, 3, c] (absent when shared) and bias [c]."""

  kernel_shape: tuple[int, int, int] | None
  width: int

  def setup(self):
    if self.kernel_shape is not None:
      self.kernel = self.param("kernel", KERNEL_INIT, (*self.kernel_shape, 3, self.width))
    self.bias = self.param("bias", LOGICAL(nn.initializers.zeros_init(), ("embed",)), (self.width,))


class SparseTubes(nn.Module):
  """[b, t, h, w, 3] -> tokens [b, L, c] of every tube that fits, + the fixed position embedding.

  Every tube's parameters exist whatever the input (an image skips the long tubes but keeps their
  kernels), so one set of parameters serves images and videos.
  """

  cfg: TubeViTConfig

  def setup(self):
    cfg = self.cfg
    independent = cfg.tube_kernels == "independent"
    self.tube = [
      TubeParams(tube[:3] if independent else None, cfg.width) for tube in cfg.tubes
    ]  # tube_0, tube_1, ...
    if not independent:
      self.kernel = self.param("kernel", KERNEL_INIT, (*cfg.interpolated_kernel, 3, cfg.width))

  def __call__(self, video_BTHWC):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    video = video_BTHWC.astype(dtype)
    b, clip = video.shape[0], video.shape[1:4]
    # Touching every tube creates its parameters, a skipped tube's too.
    biases = [t.bias for t in self.tube]
    tokens = []
    for i, tube in enumerate(cfg.tubes):
      if not all(tube_grid(tube, clip)):
        continue  # e.g. a multi-frame tube on an image
      ot, oh, ow = tube[6:]
      if cfg.tube_kernels == "independent":
        kernel = self.tube[i].kernel
      else:
        kernel = tube_kernel(self.kernel, tube[:3])
      x = jax.lax.conv_general_dilated(
        video[:, ot:, oh:, ow:],
        kernel.astype(dtype),
        window_strides=tube[3:6],
        padding="VALID",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      )
      x = x + biases[i].astype(dtype).reshape(1, 1, 1, 1, -1)
      tokens.append(x.reshape(b, -1, cfg.width))
    x_BLC = jnp.concatenate(tokens, axis=1)
    pos_LC = jnp.asarray(position_embedding(cfg, clip), dtype)
    return x_BLC + pos_LC[None]


def check_video(cfg: TubeViTConfig, shape) -> None:
  """Raises a ValueError naming the problem when a clip's shape does not fit the model."""
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(
      f"video must be [batch, time, height, width, 3] (an image: time 1), got {tuple(shape)}."
    )
  if not any(num_tokens(cfg, shape[1:4])):
    raise ValueError(
      f"no tube of model.tubes {cfg.tubes} fits a {shape[1]}x{shape[2]}x{shape[3]} clip, so it "
      "gives no tokens; add a tube that fits (e.g. (1, 16, 16, 32, 16, 16, 0, 0, 0))."
    )


class TubeViT(nn.Module):
  """Sparse tubes, a ViT, attention pooling: [b, t, h, w, 3] in [0, 1] -> logits [b, classes]."""

  cfg: TubeViTConfig

  def setup(self):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    self.tubes = SparseTubes(cfg)
    self.encoder = layers.ViTEncoder(
      cfg.depth, cfg.num_heads, cfg.mlp_dim, dtype, cfg.remat, name="Transformer"
    )
    self.pool = layers.AttentionPool(cfg.num_heads, cfg.mlp_dim, dtype, name="MAPHead_0")
    self.head = layers.ClassifierHead(cfg.num_classes, cfg.rep_size, cfg.classifier_dropout)

  def encode(self, video_BTHWC):
    """Final-layer tokens [b, L, c], the tubes' tokens in model.tubes order."""
    check_video(self.cfg, video_BTHWC.shape)
    x = self.tubes(video_BTHWC)
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_embed"))
    return self.encoder(x)

  def tokens(self, video_BTHWC, train: bool = False):
    """Final-layer tokens [b, 1, L, c]: one time slot, since tubes span frames unevenly."""
    del train
    return self.encode(video_BTHWC)[:, None]

  def __call__(self, video_BTHWC, train: bool = False):
    return self.head(self.pool(self.encode(video_BTHWC)), train)


# ----------------------------------------------------------------------------- FLOPs


def tubes_flops(cfg: TubeViTConfig, clip_thw: Sequence[int]) -> float:
  """Forward FLOPs of the tube convolutions (2 per multiply-add; the interpolation of a shared
  kernel is per step, not per clip, and left out)."""
  return float(
    sum(
      2 * n * int(np.prod(tube[:3])) * 3 * cfg.width
      for n, tube in zip(num_tokens(cfg, clip_thw), cfg.tubes, strict=True)
    )
  )


def pool_flops(cfg: TubeViTConfig, tokens: int) -> float:
  """Forward FLOPs of the attention pooling: one query over `tokens` tokens, then its MLP."""
  c = cfg.width
  projections = 2 * c * c * 2 + 2 * 2 * tokens * c * c  # probe query and out; keys and values
  return float(projections + 2 * 2 * tokens * c + 2 * 2 * c * cfg.mlp_dim)


def head_flops(cfg: TubeViTConfig) -> float:
  rep = cfg.rep_size or 0
  return 2.0 * cfg.width * rep + 2.0 * (rep or cfg.width) * cfg.num_classes


def forward_flops(cfg: TubeViTConfig, num_frames: int, image_size: int, head: bool = True) -> float:
  """Analytic forward FLOPs of one clip (matmuls, convolutions, attention; 2 per multiply-add)."""
  clip = (num_frames, image_size, image_size)
  tokens = sum(num_tokens(cfg, clip))
  blocks = cfg.depth * tokens * layers.vit_block_flops(cfg.width, cfg.mlp_dim, tokens)
  total = tubes_flops(cfg, clip) + blocks + pool_flops(cfg, tokens)
  return float(total + (head_flops(cfg) if head else 0))


# ----------------------------------------------------------------------------- checks


def config_errors(cfg: TubeViTConfig, mesh_shape: Mapping[str, int], num_frames, image_size):
  """Sizes that do not split over the mesh; tubes that cannot fit the clip at all."""
  errors = layers.vit_mesh_errors(cfg.width, cfg.num_heads, cfg.mlp_dim, mesh_shape)
  clip = (num_frames, image_size, image_size)
  skipped = []
  for i, tube in enumerate(cfg.tubes):
    counts = tube_grid(tube, clip)
    if not any(counts):
      errors.append(
        f"model.tubes[{i}] {tube[:3]} from offset {tube[6:]} is larger than the "
        f"{num_frames}x{image_size}x{image_size} clip in every dimension; shrink the tube or "
        "its offset, or raise data.num_frames / data.image_size"
      )
    elif not all(counts):
      skipped.append(i)
  if skipped and len(skipped) == len(cfg.tubes):
    errors.append(
      f"no tube of model.tubes fits a {num_frames}x{image_size}x{image_size} clip (the model "
      "would have no tokens); add one that does, e.g. (1, 16, 16, 32, 16, 16, 0, 0, 0)"
    )
  elif skipped:
    logging.info(
      "tubevit: tubes %s do not fit a %dx%dx%d clip and give no tokens (skipped).",
      skipped,
      num_frames,
      image_size,
      image_size,
    )
  return errors


def token_grid(cfg: TubeViTConfig, num_frames: int, image_size: int) -> TokenGrid:
  return TokenGrid(1, 0, 1, sum(num_tokens(cfg, (num_frames, image_size, image_size))))


def clip_for_shapes(cfg: TubeViTConfig, image_size: int) -> tuple[int, int, int, int, int]:
  """A clip shape in which every tube fits (parameters do not depend on it)."""
  frames = max(tube[0] + tube[6] for tube in cfg.tubes)
  side = max([image_size] + [max(t[1] + t[7], t[2] + t[8]) for t in cfg.tubes])
  return (1, frames, side, side, 3)


def expected_shapes(cfg: TubeViTConfig, image_size: int) -> dict[str, tuple[int, ...]]:
  """Flat {"a/b": shape} of TubeViT's parameters."""
  video = jax.ShapeDtypeStruct(clip_for_shapes(cfg, image_size), jnp.float32)
  variables = jax.eval_shape(TubeViT(cfg).init, jax.random.key(0), video)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


# ----------------------------------------------------------------------------- ImageNet ViT


def image_tube(cfg: TubeViTConfig, patch_hw: Sequence[int]) -> int | None:
  """Index of the first one-frame tube with the image ViT's patch size, None if there is none."""
  for i, tube in enumerate(cfg.tubes):
    if tube[0] == 1 and tuple(tube[1:3]) == tuple(patch_hw):
      return i
  return None


def import_image_vit(vit: vit_checkpoint.ImageViT, cfg: TubeViTConfig, image_size: int):
  """An ImageNet ViT -> (flat params under our paths, notes, keys left fresh) for init_from.

  The ViT's blocks and encoder_norm load as they are; its 2-D patch kernel and bias become the
  one-frame tube of its patch size (tubes/tube_{i}/kernel [1, p, p, 3, c]), so an image is embedded
  exactly as the ViT embeds it before the position embedding (ours is fixed sin-cos: the ViT's
  learned one and its CLS are unused). The other tubes, the pooling and the classifier start
  fresh. With tube_kernels="interpolated" there is no per-tube kernel to fill: only its bias.
  """
  vit.check_fits(
    "TubeViT",
    width=cfg.width,
    depth=cfg.depth,
    num_heads=cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
    patch_hw=vit.patch_size,  # the patch size is matched to a tube below
  )
  params = {**vit.block_params("Transformer/"), **vit.encoder_norm_params("Transformer/")}
  how: dict[str, str] = {}
  extra = ["the ViT's position embedding and CLS are unused (TubeViT's position is fixed sin-cos)"]
  index = image_tube(cfg, vit.patch_size)
  if index is None:
    extra.append(
      f"no 1x{vit.patch_size[0]}x{vit.patch_size[1]} tube in model.tubes: the ViT's patch "
      "embedding is unused"
    )
  else:
    params[f"tubes/tube_{index}/bias"] = vit.patch_bias
    if cfg.tube_kernels == "independent":
      params[f"tubes/tube_{index}/kernel"] = vit.patch_kernel[None]
      how[f"tubes/tube_{index}/kernel"] = f"the 2-D patch kernel as tube {index}'s one frame"
    else:
      extra.append(
        "tube_kernels='interpolated' has one shared kernel: the ViT's patch kernel is unused"
      )
  expected = expected_shapes(cfg, image_size)
  misshaped = [
    f"{k}: {tuple(v.shape)} vs {expected.get(k)}"
    for k, v in params.items()
    if tuple(v.shape) != expected.get(k)
  ]
  if misshaped:
    raise ValueError(f"init_from: the ImageNet ViT maps to mis-shaped TubeViT keys: {misshaped}.")
  fresh = sorted(k for k in expected if k not in params)
  loaded = [k for k in params if k not in how]
  return params, vit_checkpoint.import_notes(vit, loaded, how, fresh) + extra, fresh


def import_npz(flat: Mapping[str, np.ndarray], cfg: TubeViTConfig, image_size: int, with_head):
  """An ImageNet ViT .npz -> (flat params, notes, keys left fresh) for init_from
  (`import_image_vit`); the classifier always starts fresh."""
  del with_head  # an image classifier never fits the video classes
  if not vit_checkpoint.is_image_vit(flat):
    raise ValueError(
      "init_from: model tubevit loads only ImageNet ViT .npz files (vision_transformer or "
      "big_vision layout); to start from another TubeViT run, give its workdir."
    )
  return import_image_vit(vit_checkpoint.read(flat), cfg, image_size)


FAMILY = ModelFamily(
  name="tubevit",
  config_class=TubeViTConfig,
  variants=VARIANTS,
  build=TubeViT,
  config_errors=config_errors,
  forward_flops=forward_flops,
  token_grid=token_grid,
  import_npz=import_npz,
  causal=False,
)
