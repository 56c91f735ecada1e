"""Tiny TRecViT MAE pre-training on the synthetic motion dataset, on CPU (tube masking).

  python -m trecvit_dist.main --config configs/synthetic_mae_tiny.py --workdir /tmp/trecvit_mae_tiny

Hardware: any CPU (2 cores are enough). The model is configs/synthetic_tiny.py's (width 64, depth
2, patch 8 on 32x32 frames: 16 tubes per frame) with a 1-layer decoder of width 32; the dataset is
generated into WORKDIR/data on the first run. Labels are not read (unlabelled data, label -1, is
fine). Mask ratio 0.75 rather than the paper's 0.9: 0.9 of 16 tubes leaves 2 visible.

Expected (measured with mae_task.mae_loss, this config's optimizer and data pipeline in a scratch
loop, not yet through the trainer): 300 steps in ~2 min on 2 busy CPU cores; train/loss 2.0 ->
0.99 (norm_pix: 1.0 is predicting each patch's mean), eval/psnr 5.4 -> 14.6 dB. That is about the
dataset-mean baseline (14.4 dB): the synthetic backgrounds are random at the patch scale, so a
masked tube is unpredictable from the visible ones (the nearest visible patch does worse, 12.9 dB).
A smoke test of the MAE path, not a quality benchmark; the same model overfits one batch of 8
videos to 18 dB in 400 steps, so it does learn when the content is predictable.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.task = "mae"
  c.mae = ml_collections.ConfigDict(
    dict(
      ratio=0.75,
      norm_pix=True,
      decoder_width=32,
      decoder_depth=1,
      decoder_heads=2,
      decoder_mlp_dim=config_dict.placeholder(int),
      decoder_posemb="sincos2d",
      image_videos=4,
      image_frames=8,
    )
  )
  c.seed = 0
  c.batch_size = 32
  c.total_steps = 300
  c.model.variant = ""
  c.model.num_classes = 4  # unused by the MAE model
  c.model.width = 64
  c.model.depth = 2
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.model.patch_size = (1, 8, 8)
  c.model.rep_size = 64
  c.model.dtype = "float32"
  c.data.num_frames = 8
  c.data.stride = 2
  c.data.image_size = 32
  c.data.scale_jitter = (1.0, 1.0)
  c.data.flip = True
  c.data.workers = 0
  c.data.synthetic.num_train = 2048
  c.data.synthetic.num_validation = 256
  c.data.synthetic.frames = 16
  c.data.synthetic.size = 32
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.05
  c.optimizer.b2 = 0.95
  c.label_smoothing = 0.0
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  return c
