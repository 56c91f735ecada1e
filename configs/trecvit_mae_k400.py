"""TRecViT masked auto-encoding pre-training on Kinetics-400 (paper supplementary). `:Ti/S/B/L/H`.

  python -m trecvit_dist.main --config configs/trecvit_mae_k400.py:B \
      --workdir gs://BUCKET/runs/mae_k400_b --config.data.path=gs://BUCKET/data/k400

Hardware: TPU v5p-128 (64 chips) for B; global batch 1024. Paper settings: lr 3e-4, weight decay
0.05, 16 frames at stride 2, 1600 epochs of the ~240k training videos, tube masking at ratio 0.9
(one 2D mask for all frames: the masked tubes' LRUs are dropped from the encoder), L2 loss on the
masked patches. Ours, not in the supplementary: batch 1024, AdamW b2 0.95 and 40 warm-up epochs
(VideoMAE's), per-patch normalised targets (norm_pix), a 4-layer TRecViT-block decoder of half the
encoder's width. The encoder sees 21 of 197 tokens per frame, so no remat. Expected time and
result (masked-patch loss, eval/psnr_masked, and the readout accuracy of configs/trecvit_readout_*.py on
its encoder): not measured yet.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import apply_size, base_config

NUM_TRAIN_VIDEOS = 240_000
# Decoder (width, heads) per encoder size: about half the encoder's width, VideoMAE-like.
DECODER = {"Ti": (96, 3), "S": (192, 3), "B": (384, 6), "L": (512, 8), "H": (640, 8)}


def mae_fields(variant: str) -> ml_collections.ConfigDict:
  """config.mae: masking, targets, decoder size, TensorBoard reconstruction images."""
  width, heads = DECODER.get(variant, DECODER["B"])
  return ml_collections.ConfigDict(
    dict(
      ratio=0.9,  # fraction of spatial tubes masked: k = n - round(ratio * n) stay visible
      norm_pix=True,  # targets: each patch normalised by its own mean / variance
      decoder_width=width,
      decoder_depth=4,
      decoder_heads=heads,
      decoder_mlp_dim=config_dict.placeholder(int),  # unset: 4 * decoder_width
      decoder_posemb="sincos2d",  # or "learned"
      image_videos=4,  # videos in the eval/mae reconstruction images
      image_frames=8,  # frames per video in those images
    )
  )


def get_config(arg="B"):
  c = apply_size(base_config(), arg)
  c.task = "mae"
  c.mae = mae_fields(arg)
  c.model.num_classes = 400  # unused by the MAE model; set so classes.txt is not needed
  c.batch_size = 1024
  epochs = 1600
  c.total_steps = epochs * NUM_TRAIN_VIDEOS // c.batch_size
  c.data.num_frames = 16
  c.data.stride = 2
  c.data.image_size = 224
  c.data.scale_jitter = (0.875, 1.33)
  c.data.flip = True
  c.data.workers = 16
  c.data.eval_clips = 1
  c.data.eval_crops = 1
  c.optimizer.learning_rate = 3e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.b2 = 0.95
  c.optimizer.warmup_steps = 40 * NUM_TRAIN_VIDEOS // c.batch_size
  c.label_smoothing = 0.0
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  c.keep_every_steps = 50_000
  c.log_every_steps = 100
  return c
