"""Tiny TRecViT MAE pre-training on the synthetic motion dataset, on CPU (tube masking).

  python -m trecvit_dist.main --config configs/synthetic_mae_tiny.py --workdir workdirs/mae_tiny
  python -m trecvit_dist.main --config configs/synthetic_readout_tiny.py \
      --workdir workdirs/readout_tiny --config.init_from=workdirs/mae_tiny

Hardware: any CPU (2 cores are enough). The encoder is configs/synthetic_tiny.py's (width 64,
depth 2, patch 8 on 32x32 frames: 16 tubes per frame) with a 1-layer decoder of width 64; the
dataset is generated into WORKDIR/data on the first run. Labels are not read.

Not the paper's settings, for a 16-tube toy: ratio 0.5 (0.9 of 16 leaves 2 tubes), raw-pixel
targets (norm_pix=False: normalised within a patch, this data's smooth background is mostly JPEG
and sensor noise, and 1.0, predicting each patch's mean, is near the optimum), lr 5e-3.

Expected (measured on the 2-core CPU VM, see docs/benchmarks.md), ~1 min 40 s: the train loss
falls from ~1.0 (random decoder) to ~0.04 in 100 steps, about predicting the dataset mean (the
baseline is 14.65 dB eval/psnr_masked, loss 0.0388); it then learns to place the moving shape in masked tubes slowly: ~+0.2 dB at step
400, +3.7 dB after ~1000 steps (--config.total_steps=1000 --config.optimizer.learning_rate=2e-3).
What 400 steps already learn shows in the readout: configs/synthetic_readout_tiny.py on this
encoder reaches 52-54% top-1 where the same readout on the random-init encoder gets 25-38%.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import load_sibling


def get_config(arg=None):
  del arg
  c = load_sibling(__file__, "synthetic_tiny")  # its encoder, data and optimizer, changed below
  c.task = "mae"
  c.mae = ml_collections.ConfigDict(
    dict(
      ratio=0.5,
      norm_pix=False,
      decoder_width=64,
      decoder_depth=1,
      decoder_heads=4,
      decoder_mlp_dim=config_dict.placeholder(int),
      decoder_posemb="sincos2d",
      image_videos=4,
      image_frames=8,
    )
  )
  c.total_steps = 400
  c.model.num_classes = 4  # unused by the MAE model
  c.data.flip = True  # labels are not read: flipping is just augmentation here
  c.optimizer.learning_rate = 5e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.b2 = 0.95
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c
