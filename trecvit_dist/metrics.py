"""CLU metrics, the TensorBoard writer, and the analytic FLOPs count behind perf/mfu."""

import os

import flax
import jax
from clu import metric_writers, metrics

from trecvit_dist.models import TRecViTConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # CLU's writer imports TensorFlow.


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class MAETrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  psnr_masked: metrics.Average.from_output("psnr")  # masked patches, [0, 1] pixels, dB
  loss_pixels: metrics.Average.from_output("loss_pixels")  # the pixel probe's masked MSE


def train_metrics_class(task: str) -> type[metrics.Collection]:
  return MAETrainMetrics if task == "mae" else TrainMetrics


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files in the workdir from process 0; plain logging elsewhere."""
  return metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )


# Dense bf16 peak FLOP/s per chip (vendor figures). Used for perf/mfu; unknown kinds skip it.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,  # v5p reports "TPU v5"
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100 80GB HBM3": 989e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> "float | None":
  if override:
    return float(override)
  return PEAK_FLOPS.get(jax.devices()[0].device_kind)


def blocks_flops(cfg: TRecViTConfig, frames: int, tokens_per_frame: int) -> float:
  """Forward FLOPs (2 per multiply-add) of cfg.depth blocks on [frames, tokens_per_frame] tokens.

  Counts matmuls and attention; element-wise work (norms, gates' nonlinearities, the scan
  itself) is left out, as is customary for MFU.
  """
  c, lru, mlp = cfg.width, cfg.lru_width, cfg.mlp_dim
  per_token = 0
  if cfg.temporal_blocks:
    per_token += 2 * (2 * c * lru)  # linear_x, linear_y
    per_token += 2 * lru * c  # linear_out
    per_token += 2 * 2 * lru * (lru // cfg.gate_heads)  # block-diagonal input and a gates
    per_token += 2 * cfg.conv1d_temporal_width * lru  # depthwise conv
  per_token += 2 * 4 * c * c  # q, k, v, out
  per_token += 2 * 2 * tokens_per_frame * c  # scores and weighted values
  per_token += 2 * 2 * c * mlp  # MLP
  return float(cfg.depth * frames * tokens_per_frame * per_token)


def _grid(cfg: TRecViTConfig, num_frames: int, image_size: int) -> tuple[int, int, int]:
  """(frames t, patches per frame n, pixels per patch P * 3)."""
  pt, ph, pw = cfg.patch_size
  return num_frames // pt, (image_size // ph) * (image_size // pw), pt * ph * pw * 3


def forward_flops_per_clip(cfg: TRecViTConfig, num_frames: int, image_size: int) -> float:
  """Analytic forward FLOPs of one clip through TRecViT (see blocks_flops)."""
  t, n, patch_dim = _grid(cfg, num_frames, image_size)
  c, cls = cfg.width, int(cfg.use_cls_token)
  patch = 2 * t * n * patch_dim * c
  head = 2 * t * c * (cfg.rep_size or 0) + 2 * (cfg.rep_size or c) * cfg.num_classes
  return float(patch + blocks_flops(cfg, t, n + cls) + head)


def train_flops_per_clip(cfg: TRecViTConfig, num_frames: int, image_size: int) -> float:
  """Forward + backward: 3x the forward matmul FLOPs (remat recomputation not counted)."""
  return 3.0 * forward_flops_per_clip(cfg, num_frames, image_size)


def mae_train_flops_per_clip(
  cfg: TRecViTConfig, decoder_cfg: TRecViTConfig, num_frames: int, image_size: int, visible: int
) -> float:
  """MAE train FLOPs: the encoder on `visible` tubes (+ CLS), the decoder blocks on all n, the
  projections in and out (two heads: pred and the pixel probe); 3x forward."""
  t, n, patch_dim = _grid(cfg, num_frames, image_size)
  cls = int(cfg.use_cls_token)
  encoder = 2 * t * visible * patch_dim * cfg.width + blocks_flops(cfg, t, visible + cls)
  decoder = (
    2 * t * (visible + cls) * cfg.width * decoder_cfg.width
    + blocks_flops(decoder_cfg, t, n + cls)
    + 2 * 2 * t * n * decoder_cfg.width * patch_dim
  )
  return 3.0 * float(encoder + decoder)


def readout_train_flops_per_clip(cfg: TRecViTConfig, num_frames: int, image_size: int) -> float:
  """Readout on a frozen encoder: the encoder forward once, plus the readout's key and value
  projections and attention over all t * (n + CLS) tokens, 3x (forward and backward)."""
  t, n, patch_dim = _grid(cfg, num_frames, image_size)
  tokens = t * (n + int(cfg.use_cls_token))
  encoder = 2 * t * n * patch_dim * cfg.width + blocks_flops(cfg, t, n + int(cfg.use_cls_token))
  readout = 2 * 2 * tokens * cfg.width * cfg.width + 2 * 2 * tokens * cfg.width
  return float(encoder + 3 * readout)
