"""Frozen-feature attentive readout on Something-Something v2 of an MAE-pre-trained TRecViT.

  python -m trecvit_dist.main --config configs/trecvit_readout_ssv2.py:B \
      --workdir gs://BUCKET/runs/readout_ssv2_b --config.data.path=gs://BUCKET/data/ssv2 \
      --config.init_from=gs://BUCKET/runs/mae_k400_b     (or .../trecvit_B_mae.npz)

init_from (required): the pre-training workdir (configs/trecvit_mae_k400.py) or an official-layout
.npz, as in configs/trecvit_readout_k400.py. The encoder is frozen (stop_gradient, no optimizer
state); only the attentive readout trains. Hardware: TPU v5p-32 for B; global batch 256. Paper
settings: lr 3e-4, scale jitter (0.9, 1.33), 16 frames at stride 2, 6 epochs of ~169k videos. No
horizontal flip (left/right is part of SSv2's labels); weight decay, label smoothing and the 4
clips x 3 crops evaluation follow our supervised SSv2 config. Expected time and top-1: not
measured yet.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import apply_size, base_config

NUM_TRAIN_VIDEOS = 168_913


def get_config(arg="B"):
  c = apply_size(base_config(), arg)
  c.task = "readout"
  c.readout = ml_collections.ConfigDict(
    dict(num_heads=config_dict.placeholder(int))  # unset: the encoder's num_heads
  )
  c.init_from = ""  # required: the MAE workdir or an official .npz
  c.model.num_classes = 174
  c.batch_size = 256
  epochs = 6
  c.total_steps = epochs * NUM_TRAIN_VIDEOS // c.batch_size
  c.data.num_frames = 16
  c.data.stride = 2
  c.data.image_size = 224
  c.data.scale_jitter = (0.9, 1.33)
  c.data.flip = False
  c.data.workers = 16
  c.data.eval_clips = 4
  c.data.eval_crops = 3
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = NUM_TRAIN_VIDEOS // c.batch_size  # one epoch
  c.label_smoothing = 0.1
  c.mesh.data = -1
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  return c
