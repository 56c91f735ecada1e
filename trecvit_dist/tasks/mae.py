"""Task `mae`: masked auto-encoding pre-training of TRecViT with tube masking.

One random spatial mask per video is repeated over all frames, so a masked position is a whole
temporal tube: its gated LRU is dropped from the encoder altogether (the paper's setting). The
encoder (tokenizer + encoder, the same modules and parameter names as TRecViT, so its parameters
load into TRecViT and from official checkpoints) runs on the k visible tubes plus the CLS tube
only: [b, t, 1 + k, c]. FLOPs and activation memory scale with the visible fraction.

Decoder: TRecViT blocks (ResidualBlock + EncoderBlock, via `Encoder`) of a smaller config, rather
than ViT blocks over all t*n tokens (VideoMAE) because
  - it stays causal: the reconstruction of frame t depends on frames <= t only, like the encoder;
  - its cost is linear in t (per-frame attention over n tokens + a linear recurrence per tube),
    where joint space-time attention costs (t n)^2;
  - it reuses the encoder's building blocks, sharding rules and the Pallas LRU kernel.
Its input: the encoder's tokens projected to the decoder width, a learned mask token at every
masked position, plus a fixed 2D sin-cos position embedding of the decoder width on every patch
token (the mask token alone cannot tell positions apart). It predicts every patch of every frame:
[b, t', n, pt*ph*pw*3] (t' = t / pt; patch pixels in (pt, ph, pw, rgb) order).

Targets and PSNR. `pred` is trained on the loss target: raw pixels, or (norm_pix, the VideoMAE
default) each patch normalised by its own mean and variance. A normalised prediction cannot be
turned back into pixels without the ground truth's patch statistics, so the decoder also has a
second linear head, `pred_pixels`, that predicts raw pixels in [0, 1] from the same decoder
features under stop_gradient: it is a probe (one Dense) that never changes what the encoder and
decoder learn, and the PSNR and the reconstruction images use it whenever norm_pix is on (the
main head when it is off). Module names: tokenizer/, encoder/, mae_decoder/.

The task: the per-step RNG draws the tube mask (fold_in(seed, step), so a resume masks
identically); evaluation sums loss and PSNR with fixed masks (the trainer's eval RNG depends on
the batch index only), and shows input / masked / reconstruction images. Labels are not read, so
unlabelled data (label -1, no classes.txt) is fine. The encoder must be TRecViT (model.name).
"""

import dataclasses
import math
from typing import ClassVar

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from trecvit_dist.models import layers
from trecvit_dist.models.layers import LOGICAL
from trecvit_dist.models.trecvit import (
  Encoder,
  Tokenizer,
  TRecViTConfig,
  blocks_flops,
  check_video,
  grid,
)
from trecvit_dist.tasks.task import Task, flatten_views

NORM_PIX_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MAEDecoderConfig:
  """The MAE decoder's size; every other hyper-parameter follows the encoder's TRecViTConfig."""

  width: int = 384
  depth: int = 4
  num_heads: int = 6
  mlp_dim: int | None = None  # None: 4 * width
  posemb: str = "sincos2d"  # "sincos2d" (fixed) or "learned"

  def __post_init__(self):
    if self.posemb not in ("sincos2d", "learned"):
      raise ValueError(f"MAE decoder posemb must be 'sincos2d' or 'learned', got {self.posemb!r}.")
    if self.depth < 1:
      raise ValueError(f"MAE decoder depth must be >= 1, got {self.depth}.")

  def blocks_config(self, cfg: TRecViTConfig) -> TRecViTConfig:
    """The TRecViTConfig of the decoder's blocks: the encoder's, at the decoder's size."""
    return cfg.replace(
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim or 4 * self.width,
      lru_num_heads=None,
      rep_size=None,
    )


# ----------------------------------------------------------------------------- masking


def num_visible(num_patches: int, ratio: float) -> int:
  """k = n - round(ratio * n) (round half up); at least one tube stays visible."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}.")
  k = num_patches - int(math.floor(ratio * num_patches + 0.5))
  if k < 1:
    raise ValueError(f"mask ratio {ratio} leaves no visible tube out of {num_patches}.")
  return k


def tube_mask(rng, batch: int, num_patches: int, ratio: float = 0.9):
  """(keep_BK int32 [b, k] ascending, mask_BN bool [b, n], True = masked): one mask per video.

  The same spatial mask holds for every frame (tubes). Deterministic in rng: the trainer passes
  fold_in(seed key, step), so a resumed run masks exactly as an uninterrupted one.
  """
  k = num_visible(num_patches, ratio)
  noise_BN = jax.random.uniform(rng, (batch, num_patches))
  keep_BK = jnp.sort(jnp.argsort(noise_BN, axis=1)[:, :k], axis=1).astype(jnp.int32)
  return keep_BK, mask_from_keep(keep_BK, num_patches)


def mask_from_keep(keep_BK, num_patches: int):
  """mask_BN bool [b, n], True where a position is not in keep_BK."""
  return ~jnp.any(_one_hot_BNK(keep_BK, num_patches), axis=2)


def _one_hot_BNK(keep_BK, num_patches: int):
  # [b, n, k]: position p is kept in slot j. Element-wise, so it shards over the batch like any
  # activation (a scatter would not); b*n*k is tiny (196 x 20 per video at ratio 0.9).
  return keep_BK[:, None, :] == jnp.arange(num_patches, dtype=keep_BK.dtype)[None, :, None]


def grid_size(cfg: TRecViTConfig, video_shape) -> tuple[int, int]:
  """(gh, gw): the spatial grid of patches of a [b, t, h, w, 3] video."""
  return video_shape[2] // cfg.patch_size[1], video_shape[3] // cfg.patch_size[2]


# ----------------------------------------------------------------------------- patches


def patchify(video_BTHWC, patch_size):
  """[b, t, h, w, 3] -> [b, t/pt, n, pt*ph*pw*3] (row-major grid, like the tokenizer's tokens)."""
  pt, ph, pw = patch_size
  return einops.rearrange(
    video_BTHWC, "b (t pt) (gh ph) (gw pw) c -> b t (gh gw) (pt ph pw c)", pt=pt, ph=ph, pw=pw
  )


def unpatchify(patches_BTNP, patch_size, grid_hw):
  """The inverse of patchify: [b, t/pt, n, pt*ph*pw*3] -> [b, t, h, w, 3]."""
  pt, ph, pw = patch_size
  return einops.rearrange(
    patches_BTNP,
    "b t (gh gw) (pt ph pw c) -> b (t pt) (gh ph) (gw pw) c",
    gh=grid_hw[0],
    gw=grid_hw[1],
    pt=pt,
    ph=ph,
    pw=pw,
  )


def normalize_patches(patches_BTNP, eps: float = NORM_PIX_EPS):
  """Each patch and colour channel normalised by its own mean and variance over the patch's pixels.

  (x - mean) / sqrt(var + eps), biased variance, per channel as VideoMAE (which divides by
  std + eps instead; the two differ only on near-flat patches).
  """
  x = patches_BTNP.astype(jnp.float32).reshape(patches_BTNP.shape[:-1] + (-1, 3))
  mean = jnp.mean(x, axis=-2, keepdims=True)
  var = jnp.var(x, axis=-2, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + eps)).reshape(patches_BTNP.shape)


# ----------------------------------------------------------------------------- losses, PSNR


def masked_mse_per_video(pred_BTNP, target_BTNP, mask_BN):
  """[b]: mean squared error over the masked patches of each video (all frames, all pixels)."""
  err_BTN = jnp.mean(jnp.square(pred_BTNP.astype(jnp.float32) - target_BTNP), axis=-1)
  w_BTN = jnp.broadcast_to(mask_BN[:, None, :], err_BTN.shape).astype(jnp.float32)
  return jnp.sum(err_BTN * w_BTN, axis=(1, 2)) / jnp.maximum(jnp.sum(w_BTN, axis=(1, 2)), 1.0)


def psnr_per_video(pixels_BTNP, target_BTNP, mask_BN, max_mse_floor: float = 1e-10):
  """[b]: PSNR in dB of the masked patches, pixels in [0, 1] (the prediction is clipped to it)."""
  mse = masked_mse_per_video(jnp.clip(pixels_BTNP, 0.0, 1.0), target_BTNP, mask_BN)
  return -10.0 * jnp.log10(jnp.maximum(mse, max_mse_floor))


def reconstruction_grid(video_BTHWC, pixels_BTNP, mask_BN, patch_size, max_frames: int = 8):
  """uint8 [b, 3 * h, f * w, 3]: rows input / masked input (grey) / reconstruction, f frames.

  The reconstruction shows the prediction at masked patches and the input at visible ones.
  Frames are subsampled evenly to at most max_frames. For clu's write_images.
  """
  grid_hw = (video_BTHWC.shape[2] // patch_size[1], video_BTHWC.shape[3] // patch_size[2])
  target = patchify(video_BTHWC.astype(jnp.float32), patch_size)
  masked = mask_BN[:, None, :, None]
  grey = jnp.full_like(target, 0.5)
  recon = jnp.where(masked, jnp.clip(pixels_BTNP.astype(jnp.float32), 0.0, 1.0), target)
  rows = [unpatchify(x, patch_size, grid_hw) for x in (target, jnp.where(masked, grey, target))]
  rows.append(unpatchify(recon, patch_size, grid_hw))
  t = video_BTHWC.shape[1]
  frames = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
  rows = [r[:, frames] for r in rows]
  grid = jnp.concatenate([einops.rearrange(r, "b t h w c -> b h (t w) c") for r in rows], axis=1)
  return jnp.round(grid * 255.0).astype(jnp.uint8)


# ----------------------------------------------------------------------------- modules


class MAEDecoder(nn.Module):
  """Visible encoder tokens [b, t, (1 +) k, c] + keep_BK [b, k] -> pixels of every patch.

  Returns (pred [b, t, n, P], pred_pixels [b, t, n, P]) in float32, P = pt*ph*pw*3.
  """

  cfg: TRecViTConfig  # the encoder's
  decoder: MAEDecoderConfig

  @nn.compact
  def __call__(self, encoded_BTKC, keep_BK, grid_hw: tuple[int, int]):
    cfg, dec = self.cfg, self.decoder
    blocks_cfg = dec.blocks_config(cfg)
    dtype = jnp.dtype(cfg.dtype)
    gh, gw = grid_hw
    n = gh * gw
    x = layers.dense(dec.width, (None, "embed"), dtype, "embed")(encoded_BTKC)
    cls_BT1D, vis_BTKD = (x[:, :, :1], x[:, :, 1:]) if cfg.use_cls_token else (None, x)

    # Position p's slot in the kept list (any order of keep_BK), then a gather.
    hit_BNK = _one_hot_BNK(keep_BK, n)
    slot_BN = jnp.argmax(hit_BNK, axis=2).astype(jnp.int32)
    mask_BN = ~jnp.any(hit_BNK, axis=2)
    full_BTND = jnp.take_along_axis(vis_BTKD, slot_BN[:, None, :, None], axis=2)
    mask_token = self.param(
      "mask_token", LOGICAL(nn.initializers.normal(0.02), ("embed",)), (dec.width,)
    )
    full_BTND = jnp.where(
      mask_BN[:, None, :, None], mask_token.astype(dtype)[None, None, None, :], full_BTND
    )
    if dec.posemb == "sincos2d":
      pos_ND = jnp.asarray(layers.sincos_2d(gh, gw, dec.width))
    else:
      pos_ND = self.param(
        "pos_embedding", LOGICAL(nn.initializers.normal(0.02), (None, "embed")), (n, dec.width)
      )
    x = full_BTND + pos_ND[None, None].astype(dtype)
    if cls_BT1D is not None:
      x = jnp.concatenate([cls_BT1D, x], axis=2)
    x = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
    x, _ = Encoder(blocks_cfg, name="blocks")(x)
    if cls_BT1D is not None:
      x = x[:, :, 1:]
    patch_dim = int(np.prod(cfg.patch_size)) * 3
    pred = layers.dense(patch_dim, ("embed", None), dtype, "pred")(x)
    # A probe: trains on pixels without changing the features the main objective shapes.
    pred_pixels = layers.dense(patch_dim, ("embed", None), dtype, "pred_pixels")(
      jax.lax.stop_gradient(x)
    )
    return pred.astype(jnp.float32), pred_pixels.astype(jnp.float32)


class TRecViTMAE(nn.Module):
  """[b, t, h, w, 3] in [0, 1] + keep_BK [b, k] -> dict(pred, pred_pixels [b, t', n, P], mask).

  keep_BK None keeps every tube (no masking; also what `init` needs). Submodules tokenizer/ and
  encoder/ are TRecViT's, so their parameters are interchangeable with TRecViT's.
  """

  cfg: TRecViTConfig
  decoder: MAEDecoderConfig = MAEDecoderConfig()

  def setup(self):
    self.tokenizer = Tokenizer(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.mae_decoder = MAEDecoder(self.cfg, self.decoder)

  def encode(self, video_BTHWC, keep_BK=None):
    """Encoder on the visible tubes only: [b, t', (1 +) k, c] (k = n without keep_BK)."""
    check_video(self.cfg, video_BTHWC.shape)
    x = self.tokenizer(video_BTHWC, keep_BK)
    x = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
    encoded, _ = self.encoder(x)
    return encoded

  def __call__(self, video_BTHWC, keep_BK=None):
    grid_hw = grid_size(self.cfg, video_BTHWC.shape)
    n = grid_hw[0] * grid_hw[1]
    if keep_BK is None:
      keep_BK = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (video_BTHWC.shape[0], n))
    encoded = self.encode(video_BTHWC, keep_BK)
    pred, pred_pixels = self.mae_decoder(encoded, keep_BK, grid_hw)
    return dict(pred=pred, pred_pixels=pred_pixels, mask=mask_from_keep(keep_BK, n))


# ----------------------------------------------------------------------------- the task


@flax.struct.dataclass
class MAETrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")
  psnr_masked: clu_metrics.Average.from_output("psnr")  # masked patches, [0, 1] pixels, dB
  loss_pixels: clu_metrics.Average.from_output("loss_pixels")  # the pixel probe's masked MSE


def decoder_config(config) -> MAEDecoderConfig:
  """MAEDecoderConfig from config.mae."""
  m = config.mae
  return MAEDecoderConfig(
    width=m.decoder_width,
    depth=m.decoder_depth,
    num_heads=m.decoder_heads,
    mlp_dim=m.get("decoder_mlp_dim") or None,
    posemb=m.get("decoder_posemb", "sincos2d"),
  )


def _per_video(model, params, video_BTHWC, rng, ratio: float, norm_pix: bool):
  """Per-video loss, pixel-probe loss and PSNR [b] (and the model outputs)."""
  cfg = model.cfg
  gh, gw = grid_size(cfg, video_BTHWC.shape)
  keep_BK, mask_BN = tube_mask(rng, video_BTHWC.shape[0], gh * gw, ratio)
  out = model.apply({"params": params}, video_BTHWC, keep_BK)
  pixels = patchify(video_BTHWC.astype(jnp.float32), cfg.patch_size)
  target = normalize_patches(pixels) if norm_pix else pixels
  loss = masked_mse_per_video(out["pred"], target, mask_BN)
  loss_pixels = masked_mse_per_video(out["pred_pixels"], pixels, mask_BN)
  # Normalised predictions are not pixels; the pixel probe is (no ground-truth stats needed).
  recon = out["pred_pixels"] if norm_pix else out["pred"]
  psnr = psnr_per_video(recon, pixels, mask_BN)
  return loss, loss_pixels, psnr, dict(out, recon=recon, mask=mask_BN)


def mae_loss(model, params, video_BTHWC, rng, ratio: float, norm_pix: bool):
  """(loss, aux): MSE on masked patches (the MAE objective's value) and its gradients.

  The returned value is the objective alone, comparable with VideoMAE's numbers; its gradient
  also trains the pixel probe (a stop_gradient-ed head, see MAEDecoder). aux: loss_pixels (the
  probe's masked MSE in pixel space) and psnr (mean over videos, masked patches, dB).
  """
  loss, loss_pixels, psnr, _ = _per_video(model, params, video_BTHWC, rng, ratio, norm_pix)
  loss, loss_pixels = jnp.mean(loss), jnp.mean(loss_pixels)
  total = loss + (loss_pixels - jax.lax.stop_gradient(loss_pixels))
  return total, dict(loss_pixels=loss_pixels, psnr=jnp.mean(psnr))


def mae_eval_sums(model, params, batch, rng, ratio: float, norm_pix: bool):
  """Sums {loss, loss_pixels, psnr_masked, count} over an eval batch; divide by count.

  batch: video [B, views, T, H, W, 3] or [B, T, H, W, 3], optional mask [B] (padding rows 0);
  every view is one sample. Pass a fixed rng so evaluations at different steps see the same masks.
  """
  video, views = flatten_views(batch["video"])
  loss, loss_pixels, psnr, _ = _per_video(model, params, video, rng, ratio, norm_pix)
  weight = batch.get("mask")
  if weight is None:
    weight = jnp.ones(video.shape[:1], jnp.float32)
  else:
    weight = jnp.repeat(weight.astype(jnp.float32), views)
  return dict(
    loss=jnp.sum(loss * weight),
    loss_pixels=jnp.sum(loss_pixels * weight),
    psnr_masked=jnp.sum(psnr * weight),
    count=jnp.sum(weight),
  )


def mae_images(
  model, params, video, rng, ratio, norm_pix, max_videos: int = 4, max_frames: int = 8
):
  """uint8 [N, 3 * H, F * W, 3], rows input / masked / recon, of the first max_videos videos.

  video: a (global) eval or train batch, [B, (views,) T, H, W, 3]; the first view is shown, at
  most max_frames evenly spaced frames.
  """
  if video.ndim == 6:
    video = video[:, 0]
  video = video[:max_videos]
  _, _, _, out = _per_video(model, params, video, rng, ratio, norm_pix)
  return reconstruction_grid(video, out["recon"], out["mask"], model.cfg.patch_size, max_frames)


def mae_train_flops_per_clip(
  cfg: TRecViTConfig, decoder_cfg: TRecViTConfig, num_frames: int, image_size: int, visible: int
) -> float:
  """MAE train FLOPs: the encoder on `visible` tubes (+ CLS), the decoder blocks on all n, the
  projections in and out (two heads: pred and the pixel probe); 3x forward."""
  t, n, patch_dim = grid(cfg, num_frames, image_size)
  cls = int(cfg.use_cls_token)
  encoder = 2 * t * visible * patch_dim * cfg.width + blocks_flops(cfg, t, visible + cls)
  decoder = (
    2 * t * (visible + cls) * cfg.width * decoder_cfg.width
    + blocks_flops(decoder_cfg, t, n + cls)
    + 2 * 2 * t * n * decoder_cfg.width * patch_dim
  )
  return 3.0 * float(encoder + decoder)


class MAE(Task):
  """Task `mae` (see the module docstring); config.mae holds the ratio, targets and decoder."""

  name = "mae"
  needs_labels = False
  fresh_prefixes: ClassVar[tuple[str, ...]] = ("mae_decoder/",)
  train_metrics = MAETrainMetrics
  image_tag = "eval/mae_input_masked_reconstruction"

  @property
  def ratio(self) -> float:
    return float(self.config.mae.ratio)

  @property
  def norm_pix(self) -> bool:
    return bool(self.config.mae.norm_pix)

  def config_errors(self, mesh_shape):
    if self.family.name != "trecvit":
      return [f"task=mae needs model.name=trecvit (tube masking), got {self.family.name!r}"]
    cfg, d = self.model_cfg, self.config.data
    n = (d.image_size // cfg.patch_size[1]) * (d.image_size // cfg.patch_size[2])
    try:
      num_visible(n, self.ratio)
      dec = decoder_config(self.config)
      blocks = dec.blocks_config(cfg)
    except ValueError as e:
      return [str(e)]
    errors = []
    tensor = mesh_shape.get("tensor", 1)
    for what, size in (
      ("mae.decoder_heads", blocks.num_heads),
      ("MAE decoder mlp_dim", blocks.mlp_dim),
      ("MAE decoder lru width", blocks.lru_width),
    ):
      if size % tensor:
        errors.append(f"{what} {size} is not divisible by mesh.tensor={tensor}")
    if blocks.width % mesh_shape.get("fsdp", 1):
      errors.append(f"mae.decoder_width {blocks.width} is not divisible by mesh.fsdp")
    if blocks.width % 4 and dec.posemb == "sincos2d":
      errors.append(f"mae.decoder_width {blocks.width} must be divisible by 4 (sincos2d)")
    return errors

  def build_model(self):
    return TRecViTMAE(self.model_cfg, decoder_config(self.config))

  def loss(self, model, params, batch, rng):
    return mae_loss(model, params, batch["video"], rng, self.ratio, self.norm_pix)

  def eval_sums(self, model, params, batch, rng):
    return mae_eval_sums(model, params, batch, rng, self.ratio, self.norm_pix)

  def images(self, model, params, batch, rng):
    m = self.config.mae
    return mae_images(
      model, params, batch["video"], rng, self.ratio, self.norm_pix, m.image_videos, m.image_frames
    )

  def train_flops_per_clip(self):
    cfg, d = self.model_cfg, self.config.data
    n = (d.image_size // cfg.patch_size[1]) * (d.image_size // cfg.patch_size[2])
    return mae_train_flops_per_clip(
      cfg,
      decoder_config(self.config).blocks_config(cfg),
      d.num_frames,
      d.image_size,
      visible=num_visible(n, self.ratio),
    )


TASK = MAE
