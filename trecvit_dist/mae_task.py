"""Task functions the trainer calls for config.task == "mae" (pre-training) and "readout".

mae: `mae_loss` is the train loss (the per-step RNG draws the tube mask: fold_in(seed, step), so a
resume masks identically); `make_mae_eval_step` sums loss and PSNR over an eval pass (pass a fixed
RNG, e.g. fold_in(key(seed), batch index), so evaluations at different steps see the same masks);
`make_mae_images` gives input / masked / reconstruction images for TensorBoard.
readout: `build_model` gives a ReadoutModel, a drop-in for TRecViT in train.make_train_step and
make_eval_step; the trainer wraps the optimizer with readout.frozen_encoder_tx and loads the
encoder with train.init_from (an MAE workdir or an official .npz).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from trecvit_dist.models import TRecViT, TRecViTConfig
from trecvit_dist.models import mae as mae_lib
from trecvit_dist.models.readout import ReadoutModel


def decoder_config(config: ml_collections.ConfigDict) -> mae_lib.MAEDecoderConfig:
  """MAEDecoderConfig from config.mae."""
  m = config.mae
  return mae_lib.MAEDecoderConfig(
    width=m.decoder_width,
    depth=m.decoder_depth,
    num_heads=m.decoder_heads,
    mlp_dim=m.get("decoder_mlp_dim") or None,
    posemb=m.get("decoder_posemb", "sincos2d"),
  )


def build_model(config: ml_collections.ConfigDict, cfg: TRecViTConfig) -> nn.Module:
  """TRecViT ("classification"), TRecViTMAE ("mae") or ReadoutModel ("readout")."""
  task = config.get("task", "classification")
  if task == "classification":
    return TRecViT(cfg)
  if task == "mae":
    return mae_lib.TRecViTMAE(cfg, decoder_config(config))
  if task == "readout":
    return ReadoutModel(cfg, config.get("readout", {}).get("num_heads") or None)
  raise ValueError(f"Unknown config.task {task!r}; choose classification, mae or readout.")


# ----------------------------------------------------------------------------- MAE


def _num_patches(cfg: TRecViTConfig, video_shape) -> int:
  gh, gw = mae_lib.grid_size(cfg, video_shape)
  return gh * gw


def _per_video(model, params, video_BTHWC, rng, ratio: float, norm_pix: bool):
  """Per-video loss, pixel-probe loss and PSNR [b] (and the model outputs)."""
  cfg = model.cfg
  keep_BK, mask_BN = mae_lib.tube_mask(
    rng, video_BTHWC.shape[0], _num_patches(cfg, video_BTHWC.shape), ratio
  )
  out = model.apply({"params": params}, video_BTHWC, keep_BK)
  pixels = mae_lib.patchify(video_BTHWC.astype(jnp.float32), cfg.patch_size)
  target = mae_lib.normalize_patches(pixels) if norm_pix else pixels
  loss = mae_lib.masked_mse_per_video(out["pred"], target, mask_BN)
  loss_pixels = mae_lib.masked_mse_per_video(out["pred_pixels"], pixels, mask_BN)
  # Normalised predictions are not pixels; the pixel probe is (no ground-truth stats needed).
  recon = out["pred_pixels"] if norm_pix else out["pred"]
  psnr = mae_lib.psnr_per_video(recon, pixels, mask_BN)
  return loss, loss_pixels, psnr, dict(out, recon=recon, mask=mask_BN)


def mae_loss(model, params, video_BTHWC, rng, ratio: float, norm_pix: bool):
  """(loss, aux): MSE on masked patches (the MAE objective's value) and its gradients.

  The returned value is the objective alone, comparable with VideoMAE's numbers; its gradient
  also trains the pixel probe (a stop_gradient-ed head, see models/mae.py). aux: loss_pixels
  (the probe's masked MSE in pixel space) and psnr (mean over videos, masked patches, dB).
  """
  loss, loss_pixels, psnr, _ = _per_video(model, params, video_BTHWC, rng, ratio, norm_pix)
  loss, loss_pixels = jnp.mean(loss), jnp.mean(loss_pixels)
  total = loss + (loss_pixels - jax.lax.stop_gradient(loss_pixels))
  return total, dict(loss_pixels=loss_pixels, psnr=jnp.mean(psnr))


def make_mae_loss_fn(model, config: ml_collections.ConfigDict):
  """loss_fn(params, video, label, rng) -> (loss, aux), train.make_train_step's loss_fn shape.

  The label is ignored (unlabelled videos, label -1, are fine). Use value_and_grad(has_aux=True).
  """
  ratio, norm_pix = float(config.mae.ratio), bool(config.mae.norm_pix)

  def loss_fn(params, video, label, rng):
    del label
    return mae_loss(model, params, video, rng, ratio, norm_pix)

  return loss_fn


def _flatten_views(video):
  """[B, views, T, H, W, 3] (the eval pipeline's) -> [B * views, ...]; [B, T, H, W, 3] as is."""
  if video.ndim == 6:
    return video.reshape((video.shape[0] * video.shape[1],) + video.shape[2:]), video.shape[1]
  return video, 1


def make_mae_eval_step(model, ratio: float, norm_pix: bool):
  """eval_step(params, batch, rng) -> sums {loss, loss_pixels, psnr_masked, count}; / count.

  batch: video [B, views, T, H, W, 3] or [B, T, H, W, 3], optional mask [B] (padding rows 0);
  every view is one sample. Labels are not read.
  """

  def eval_step(params, batch, rng):
    video, views = _flatten_views(batch["video"])
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

  return eval_step


def make_mae_images(model, ratio: float, norm_pix: bool, max_videos: int = 4, max_frames: int = 8):
  """images(params, video, rng) -> uint8 [N, 3 * H, F * W, 3], rows input / masked / recon.

  video: a (global) eval or train batch, [B, (views,) T, H, W, 3]; the first max_videos videos
  (first view) are shown, at most max_frames evenly spaced frames. Jit it with replicated output
  and call it on every process; process 0 writes writer.write_images(step, {"eval/mae": x}).
  """

  def images(params, video, rng):
    if video.ndim == 6:
      video = video[:, 0]
    video = video[:max_videos]
    _, _, _, out = _per_video(model, params, video, rng, ratio, norm_pix)
    return mae_lib.reconstruction_grid(
      video, out["recon"], out["mask"], model.cfg.patch_size, max_frames
    )

  return images


# ----------------------------------------------------------------------------- config checks


def config_errors(config: ml_collections.ConfigDict, cfg: TRecViTConfig, mesh_shape) -> list[str]:
  """The task's config errors (for train.validate): readout without init_from, MAE sizes.

  mesh_shape: {"data": ..., "fsdp": ..., "tensor": ...}.
  """
  task = config.get("task", "classification")
  errors = []
  if task == "readout" and not config.init_from:
    errors.append("task=readout needs init_from (an MAE workdir or an official .npz)")
  if task == "mae":
    d = config.data
    n = (d.image_size // cfg.patch_size[1]) * (d.image_size // cfg.patch_size[2])
    try:
      mae_lib.num_visible(n, float(config.mae.ratio))
      dec = decoder_config(config)
      blocks = dec.blocks_config(cfg)
    except ValueError as e:
      return errors + [str(e)]
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
