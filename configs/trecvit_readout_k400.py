"""Frozen-feature attentive readout on Kinetics-400 of an MAE-pre-trained TRecViT. `:Ti/S/B/L/H`.

  python -m trecvit_dist.main --config configs/trecvit_readout_k400.py:B \
      --workdir gs://BUCKET/runs/readout_k400_b --config.data.path=gs://BUCKET/data/k400 \
      --config.init_from=gs://BUCKET/runs/mae_k400_b     (or .../trecvit_B_mae.npz)

init_from (required): the pre-training workdir (configs/trecvit_mae_k400.py; its newest
checkpoint's tokenizer/ and encoder/) or an official-layout .npz (its decoder/ keys are ignored
and logged). The encoder is frozen (stop_gradient, no optimizer state); only the readout (a learned
query cross-attending to all tokens of all frames) trains. Hardware: TPU v5p-32 for B (frozen
encoder: forward only); global batch 256. Paper settings: lr 3e-4, scale jitter (0.9, 1.33), 16
frames at stride 2, 30 epochs of ~240k videos. Weight decay, label smoothing and the 4 clips x 3
crops evaluation follow our supervised K400 config. Expected time and top-1: not measured yet.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import apply_size, base_config

NUM_TRAIN_VIDEOS = 240_000


def get_config(arg="B"):
  c = apply_size(base_config(), arg)
  c.task = "readout"
  c.readout = ml_collections.ConfigDict(
    dict(num_heads=config_dict.placeholder(int))  # unset: the encoder's num_heads
  )
  c.init_from = ""  # required: the MAE workdir or an official .npz
  c.model.num_classes = 400
  c.batch_size = 256
  epochs = 30
  c.total_steps = epochs * NUM_TRAIN_VIDEOS // c.batch_size
  c.data.num_frames = 16
  c.data.stride = 2
  c.data.image_size = 224
  c.data.scale_jitter = (0.9, 1.33)
  c.data.flip = True
  c.data.workers = 16
  c.data.eval_clips = 4
  c.data.eval_crops = 3
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = NUM_TRAIN_VIDEOS // c.batch_size  # one epoch
  c.label_smoothing = 0.1
  c.mesh.data = -1
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  return c
